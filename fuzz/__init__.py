"""Fuzzing the file loaders: safetensors, the safe torch unpickler (zip and legacy layouts), diffusers folders and
input images.

- :mod:`fuzz.targets`: one function per target taking ``bytes``; clean refusals are swallowed, anything else is a
  finding (see :func:`fuzz.targets.classify`);
- :mod:`fuzz.corpus`: seed corpora written by the real libraries (safetensors, torch.save, diffusers, Pillow);
- :mod:`fuzz.run`: the atheris runner, ``python -m fuzz.run TARGET [libFuzzer flags]``.

The short run lives in ``tests/test_fuzz.py``; the long runs' figures in ``fuzz/RESULTS.md``.
"""
