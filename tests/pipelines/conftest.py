"""Tiny offline components for the pipeline tests: a scripted SPHINX, a tiny random SAM, tiny SD.

Nothing is downloaded: SAM is built from ``segment_anything.modeling`` classes with small widths,
the diffusion components follow diffusers' ``get_dummy_components`` and the CLIP tokenizer is a
character-level BPE written to a temporary folder (one token per character, so prompts reach
the 77-token window quickly).
"""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["SPHINX_TOOLS_LOAD_PLUGINS"] = "none"  # before the registry loads: built-ins only

_spec = importlib.util.spec_from_file_location(
    "_tasks_conftest", Path(__file__).resolve().parent.parent / "tasks" / "conftest.py"
)
_tasks_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tasks_conftest)
FakeModel = _tasks_conftest.FakeModel  # the scripted model: enqueue(text), generate pops


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path, monkeypatch):
    monkeypatch.setenv("SPHINX_TOOLS_CONFIG", str(tmp_path / "prompts.yaml"))
    monkeypatch.setenv("SPHINX_TOOLS_LOAD_PLUGINS", "none")


@pytest.fixture
def fake_model():
    return FakeModel()


# -- SAM ---------------------------------------------------------------------------------------
from tiny_sam import SAM_IMG_SIZE, tiny_sam  # noqa: E402,F401


def count_calls(predictor):
    "Count image-encoder runs (forward hook) and ``predict_torch`` calls (wrapper) on a predictor."
    predictor.encoder_calls = 0
    predictor.predict_calls = []

    def hook(*_):
        predictor.encoder_calls += 1

    predictor.model.image_encoder.register_forward_hook(hook)
    inner = predictor.predict_torch

    def predict_torch(point_coords, point_labels, boxes=None, **kwargs):
        predictor.predict_calls.append(
            {"boxes": boxes, "point_coords": point_coords, "point_labels": point_labels, **kwargs}
        )
        return inner(point_coords, point_labels, boxes=boxes, **kwargs)

    predictor.predict_torch = predict_torch
    return predictor


@pytest.fixture
def sam_predictor():
    "A real ``SamPredictor`` around the tiny random SAM, with call counters."
    from segment_anything import SamPredictor

    return count_calls(SamPredictor(tiny_sam()))


@pytest.fixture
def box_sam():
    """A ``SamPredictor`` whose best mask is exactly its prompt box, mapped back to pixels.

    It runs the real tiny SAM (shapes, devices), then replaces the masks: candidate 1 is the box
    rectangle (predicted IoU 0.9), candidate 0 is empty (0.2) and candidate 2 is full (0.5). A box
    that went into SAM's frame wrongly gives a mask that does not line up with the box.
    """
    from segment_anything import SamPredictor

    class BoxSam(SamPredictor):
        def predict_torch(
            self, point_coords, point_labels, boxes=None, multimask_output=True, **kw
        ):
            masks, iou, low = super().predict_torch(
                point_coords, point_labels, boxes=boxes, multimask_output=multimask_output, **kw
            )
            h, w = self.original_size
            new_h, new_w = self.transform.get_preprocess_shape(h, w, self.transform.target_length)
            scale = torch.tensor([new_w / w, new_h / h] * 2, device=boxes.device)
            pixel_boxes = (boxes / scale).round().long()  # back to original pixels
            rect = torch.zeros(len(boxes), h, w, dtype=torch.bool)
            for i, (x1, y1, x2, y2) in enumerate(pixel_boxes.tolist()):
                rect[i, y1:y2, x1:x2] = True
            if not multimask_output:
                return rect[:, None], torch.full((len(boxes), 1), 0.9), low
            masks = torch.stack([torch.zeros_like(rect), rect, torch.ones_like(rect)], dim=1)
            return masks, torch.tensor([[0.2, 0.9, 0.5]]).repeat(len(boxes), 1), low

    return count_calls(BoxSam(tiny_sam()))


# -- Stable Diffusion --------------------------------------------------------------------------
def _bytes_to_unicode() -> dict:
    "GPT-2/CLIP byte -> printable character table (printable bytes map to themselves)."
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), 256),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_tiny_clip_tokenizer(folder: Path) -> Path:
    "vocab.json (every byte char, alone and as a word end) + an empty merges.txt."
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def sd_components(tmp_path_factory):
    "Tiny text encoder, tokenizer, VAE and scheduler shared by the SD and inpainting pipelines."
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = write_tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=2,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "scheduler": scheduler,
    }


def tiny_unet(in_channels: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    ).eval()


@pytest.fixture(scope="session")
def sd_pipeline(sd_components):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        unet=tiny_unet(4),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **sd_components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def inpaint_pipeline(sd_components):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(
        unet=tiny_unet(9),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **sd_components,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_pipeline_calls(pipe, monkeypatch):
    "Record the keyword arguments of each call of a diffusers pipeline (class-level patch)."
    calls = []
    inner = type(pipe).__call__

    def call(self, *args, **kwargs):
        calls.append(kwargs)
        return inner(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", call)
    return calls


# -- images ------------------------------------------------------------------------------------
@pytest.fixture
def shapes_scene():
    from sphinx_tools.demo.synth import generate_scene

    return generate_scene("shapes", seed=3)


def gray_image(w: int, h: int, seed: int = 0) -> np.ndarray:
    "An HWC uint8 RGB array of noise, ``(h, w, 3)``."
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
