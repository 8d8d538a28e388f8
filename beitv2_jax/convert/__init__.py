"""PyTorch state dicts ⇄ our Flax variables, and our on-disk format for converted weights.

* ``import_state_dict(state_dict, format)`` → ``Converted(variables, model_kind, model_config, ignored, options)``
* ``export_variables(variables, format, model_kind, model_config)`` → ``{torch key: np.ndarray}``
* ``infer_config(state_dict, format)`` → ``(model_kind, model_config, notes)``: the model a state dict holds
* ``store.save_variables`` / ``store.load_variables``: directory with ``model.json`` + orbax ``variables/``
* ``torch_io.load_state_dict`` / ``save_state_dict``: ``.pth``/``.bin``/``.safetensors`` files
* ``python -m beitv2_jax.convert``: the command line (``cli.py``)

Formats (``layouts.py``): official_beitv2, official_finetune, official_vqkd, timm, dino, hf_beit, hf_vit, hf_clip,
openai_clip. Each is a table of rules (``schemes.py``) run by one engine (``engine.py``) in both directions;
missing/unexpected keys and shape mismatches are reported together in one ``ConversionError`` (a ValueError).
torch is imported only to read or write ``.pth`` files.
"""
from beitv2_jax.convert.engine import (ConversionError, Converted, export_variables, get_layout,  # noqa: F401
                                       import_state_dict, infer_config, summarize_keys)


def formats() -> list:
    """Names of the registered checkpoint layouts."""
    from beitv2_jax.convert import engine, layouts  # noqa: F401

    return sorted(engine.LAYOUTS)
