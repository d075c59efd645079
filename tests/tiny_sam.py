"A tiny random Segment Anything model (real modules, small widths) shared by the tests."

from functools import partial

import torch

SAM_IMG_SIZE = 64


def tiny_sam(seed: int = 0):
    "A random SAM with a 64 px input, 32-wide embeddings and one block everywhere."
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(seed)
    dim, patch = 32, 16
    encoder = ImageEncoderViT(
        img_size=SAM_IMG_SIZE,
        patch_size=patch,
        embed_dim=dim,
        depth=1,
        num_heads=2,
        mlp_ratio=2,
        out_chans=dim,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=0,
        global_attn_indexes=(0,),
    )
    prompt_encoder = PromptEncoder(
        embed_dim=dim,
        image_embedding_size=(SAM_IMG_SIZE // patch,) * 2,
        input_image_size=(SAM_IMG_SIZE, SAM_IMG_SIZE),
        mask_in_chans=4,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
        transformer_dim=dim,
        iou_head_depth=1,
        iou_head_hidden_dim=16,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder).eval()
