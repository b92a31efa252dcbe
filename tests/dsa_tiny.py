"""Tiny random DSA models (DeepSeek-V3.2 and GLM-MoE-DSA) for CPU tests.

Helper module (not collected by pytest). The builders live in the package
(`stem_boost.testbeds.tiny_dsa`, also the default testbed of ``stem-boost compare``); this module
re-exports them under the names the tests use.
"""

from __future__ import annotations

from stem_boost.testbeds.tiny_dsa import (  # noqa: F401
    BUILDERS,
    TINY,
    build_deepseek_v32,
    build_glm_moe_dsa,
    deepseek_v32_config,
    glm_moe_dsa_config,
    indexers,
    save_and_reload,
)
