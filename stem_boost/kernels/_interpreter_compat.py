"""Fixes for two defects of Triton's CPU interpreter (TRITON_INTERPRET=1), applied only in that mode.

1. `tl.dot` on bfloat16 operands: the interpreter stores bf16 as raw uint16 bits and multiplies the
   bits (seen with triton 3.6). We widen bf16 operands to fp32 (exact) before the product.
2. Loop bounds loaded from memory: the interpreter turns a 1-element array into a Python int with
   int(array), which numpy >= 2.4 rejects for arrays with ndim > 0. We use `.item()` instead.
3. Load / store masks that are not boolean: triton 3.9's interpreter hands the mask to its C++
   load / store, which accepts only bool arrays and raises `ValueError('mask has unsupported dtype')`
   for the int32 mask it builds itself from `k_ok[:, None]` (a loaded scalar and a block combined).
   We pass ``mask != 0``, which is what a compiled kernel does with any integer mask.
4. Speed: on every call of a jit function (a kernel and each jit helper it calls) the interpreter
   re-lists the members of triton.language with `inspect.getmembers` to find the builtins it
   patches, which was 40% of the time of a selection kernel with nested helpers. We list them once
   per module and patch the same builtins; a helper's call, inside the scope its kernel patched,
   finds them patched and skips the walk.
None changes what a compiled kernel computes; they only let CPU CI run the real kernel code, on
every triton version in the supported range (3.6 - 3.9).
"""

from __future__ import annotations

import numpy as np


def apply() -> None:
    from triton.runtime import interpreter as itp

    if getattr(itp, "_stem_boost_patched", False):
        return
    import triton.language as tl

    builder_cls = itp.InterpreterBuilder
    original_dot = builder_cls.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(h):
            if h.dtype == tl.bfloat16:
                bits = h.data.astype(np.uint32) << 16
                return itp.TensorHandle(bits.view(np.float32), tl.float32)
            return h

        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot

    original_patch_tensor = itp._patch_lang_tensor

    def patch_tensor(tensor, scope):
        original_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    itp._patch_lang_tensor = patch_tensor

    def as_bool(mask):
        if mask.data.dtype == np.bool_:
            return mask
        return itp.TensorHandle(np.asarray(mask.data) != 0, tl.int1)

    original_load = builder_cls.create_masked_load
    original_store = builder_cls.create_masked_store

    # the trailing cache / eviction arguments differ between triton versions: passed through
    def create_masked_load(self, ptrs, mask, *rest):
        return original_load(self, ptrs, as_bool(mask), *rest)

    def create_masked_store(self, ptrs, value, mask, *rest):
        return original_store(self, ptrs, value, as_bool(mask), *rest)

    builder_cls.create_masked_load = create_masked_load
    builder_cls.create_masked_store = create_masked_store

    builtins_of: dict[int, list] = {}  # id(module or class) -> [(name, builtin)], listed unpatched

    def patch_builtin(pkg, builder, scope):
        members = builtins_of.get(id(pkg))
        if members is None:  # the first call is a kernel launch, outside any patch scope
            members = [(n, m) for n, m in itp.inspect.getmembers(pkg) if tl.core.is_builtin(m)]
            builtins_of[id(pkg)] = members
        if members and getattr(pkg, members[0][0], None) is not members[0][1]:
            return  # a helper inside a patch scope: the kernel's call patched every builtin already
        for name, member in members:
            # as the interpreter does: inside a patch scope (a helper called by a kernel) the members
            # are already patched, no longer builtins, and stay as they are
            if getattr(pkg, name, None) is member:
                itp._patch_attr(pkg, name, member, builder, scope)

    if hasattr(itp, "_patch_builtin") and hasattr(itp, "_patch_attr"):  # a speed-up only: skipped if renamed
        itp._patch_builtin = patch_builtin
    itp._stem_boost_patched = True
