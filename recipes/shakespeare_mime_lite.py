"""Shakespeare next-character prediction with MimeLite (Karimireddy et al., NeurIPS 2021).

Base optimizer SGD with momentum 0.9 at client rate 1 (Reddi et al.'s
Shakespeare client rate), server rate 1; Reddi et al. protocol otherwise. No
expected accuracy is given (not checked against the paper).
Variants: paper, official, demo, tiny.
"""

from recipes._common import make


def get_config(variant: str = "paper"):
    return make("shakespeare", "mime_lite", variant, hyper_from="fedavg", expected_accuracy=None,
                paper="Karimireddy et al., Mime, NeurIPS 2021; protocol of Reddi et al. 2021",
                extra={"mime": {"base_momentum": 0.9, "client_delta_clip_norm": None}},
                variants=("paper", "official", "demo", "tiny"))
