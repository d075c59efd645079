"""Weight-only int8 quantization of the LLM's linear layers, with torchao.

``quantize_llm(transformer, "int8")`` stores the weights of every LLM linear layer (attention
q/k/v/o, the feed-forward's w1/w2/w3 and the output head) as int8 with one float scale per
output channel (symmetric); activations stay in the model's dtype and each product runs on the
int8 weights (torchao's ``Int8WeightOnlyConfig``, on CPU and CUDA). The visual encoders, the
embeddings, the norms and the mixture-of-experts blocks keep their dtype. The weights take about
a quarter of their fp32 bytes (half of bf16).
"""

from __future__ import annotations

import torch

from .model import ColumnParallelLinear, RowParallelLinear, Transformer

MODES = ("int8",)


def check_mode(mode) -> str | None:
    "``mode`` if it is None or a supported quantization, else a ValueError naming it."
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; supported: {list(MODES)} or None")
    return mode


def quantize_llm(transformer: Transformer, mode: str = "int8") -> int:
    """Quantize the LLM's linear layers of ``transformer`` in place; the number of layers.

    Raises:
        ValueError: for an unknown ``mode``.
        ImportError: when torchao is not installed (``pip install torchao``).
    """
    check_mode(mode)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise ImportError("int8 quantization needs torchao: pip install 'torchao>=0.14'") from e
    done = []

    def llm_linear(module, fqn):
        hit = isinstance(module, (ColumnParallelLinear, RowParallelLinear))
        if hit:
            done.append(fqn)
        return hit

    with torch.inference_mode(False), torch.no_grad():
        quantize_(transformer, Int8WeightOnlyConfig(), filter_fn=llm_linear)
    return len(done)


def weight_bytes(transformer: Transformer) -> int:
    "Bytes of the LLM's weights as stored (int8 data and scales of quantized layers)."
    total = 0
    for name, p in transformer.named_parameters():
        if name.startswith(("qformer.", "clip.", "openclip_convnext_xxl.", "dinov2_vitg14.")):
            continue
        inner = [getattr(p, a) for a in getattr(p, "__tensor_flatten__", lambda: ([], None))()[0]]
        total += sum(t.numel() * t.element_size() for t in inner) if inner else \
            p.numel() * p.element_size()
    return total
