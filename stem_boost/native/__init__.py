"""The native selectors of the supported families: what each model would attend to on its own.

- `dsa_indexer`: DeepSeek-V3.2's lightning indexer and its top-k, chunk by chunk (bounded memory),
  returning the candidates' scores for the Stem step.
- `infllmv2`: MiniCPM-4.1's InfLLMv2 block selection (key compression, group-summed stage-1 scores,
  max-pooling onto key blocks, forced init / local blocks, per-row top-k).
Each produces candidates that the Stem step (`stem_boost.boost`) turns into a `Selection`.
"""
