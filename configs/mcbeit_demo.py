"""mc-BEiT at the demo's size: the demo's BEiT v2 pretraining stage (configs/demo.py) with soft multi-choice
targets (omega 0.2, similarity temperature 1.0) from the demo's own VQ-KD tokenizer.

Tokenizer temperature 0.05 instead of the official 4.0: VQ-KD's logits are −(1 − cos) in [−2, 0], so 4.0 (set for
the VQGAN's logits) turns them into nearly uniform targets (the loss then stays at 2·ln 512 ≈ 12.5).

python -m beitv2_jax.main --config configs/demo.py --workdir DEMO          # makes DEMO/vqkd/tokenizer
python -m beitv2_jax.main --config configs/mcbeit_demo.py --workdir DIR --config.tokenizer.checkpoint=DEMO/vqkd/tokenizer
"""
import importlib.util
import os


def get_config():
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(os.path.dirname(__file__), "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    c = demo.demo_pretrain()
    c.targets = "multi_choice"
    c.multi_choice.tokenizer_temperature = 0.05
    return c
