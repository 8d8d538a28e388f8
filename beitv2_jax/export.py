"""``python -m beitv2_jax.export``: an alias of ``python -m beitv2_jax.convert --export`` (the one export command).

  python -m beitv2_jax.export --checkpoint FINETUNE_WORKDIR/best_model --format timm --output model.safetensors
  python -m beitv2_jax.export --checkpoint PRETRAIN_WORKDIR/model --format hf --output out/model.safetensors

``--format hf`` is ``hf_beit``; every ``convert --export`` format is accepted too. The only difference from
``convert --export`` is the default ``--rel_pos per_layer`` (a shared relative position table is copied into every
block: the timm ``beitv2_*`` layout). Both write the same files: a ``beit_pretrain`` encoder becomes
``BeitForMaskedImageModeling`` for ``hf``/``hf_beit`` (backbone + final norm + LM head; load it with that class) and
its backbone + final norm for ``timm``; Hugging Face exports get ``config.json`` and ``preprocessor_config.json``.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from beitv2_jax.convert import cli

ALIASES = {"hf": "hf_beit"}


def export_checkpoint(checkpoint: str, fmt: str, output: str, rel_pos: str = "per_layer",
                      overwrite: bool = False) -> dict:
    """``convert.cli.export_checkpoint`` with ``hf`` → ``hf_beit`` and this command's ``rel_pos`` default."""
    return cli.export_checkpoint(checkpoint, ALIASES.get(fmt, fmt), output, rel_pos=rel_pos, overwrite=overwrite)


timm_hint = cli.timm_hint


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):  # --format hf / --format=hf
        if arg == "--format" and i + 1 < len(argv):
            argv[i + 1] = ALIASES.get(argv[i + 1], argv[i + 1])
        elif arg.startswith("--format="):
            argv[i] = "--format=" + ALIASES.get(arg.split("=", 1)[1], arg.split("=", 1)[1])
    if not any(a.split("=", 1)[0] in ("--rel_pos", "--rel-pos") for a in argv):
        argv += ["--rel_pos", "per_layer"]
    return cli.main(["--export"] + argv)


if __name__ == "__main__":
    sys.exit(main())
