"""Worker for the model-parallel tests: one process per rank on gloo; results go to files.

The ranks meet in a file store in ``out`` (no port) and talk over the loopback interface only."""

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from golden_data import golden_image


def run(rank: int, world: int, ckpt: str, out: str, golden_io: str):
    from sphinx_tools.dist import init_local_world

    init_local_world(rank, world, Path(out) / "store", "gloo")
    result = {}
    try:
        from sphinx_tools import SphinxModel, build_prompt
        from sphinx_tools.errors import CheckpointError

        try:
            m = SphinxModel.from_pretrained(ckpt)
        except CheckpointError as e:
            result["error"] = str(e)
        else:
            io = torch.load(golden_io, weights_only=True)
            image = golden_image(Path(golden_io).parent, io)
            encoded = []  # views this rank runs through the encoders, per call
            encode_views = m.transformer.encode_views
            def counting(x, cx=None):
                encoded.append(x.shape[0])
                return encode_views(x, cx)

            m.transformer.encode_views = counting
            logits = m.logits(io["prompt_token_ids"][None], image[None])
            result["logits_diff"] = float((logits - io["logits"]).abs().max())
            text_only = m.logits(io["prompt_token_ids"][None], None)
            result["text_only_diff"] = float((text_only - io["logits_text_only"]).abs().max())
            gen = m.generate([io["prompt"]], [image], max_gen_len=16, stop=())[0]
            result["greedy"] = gen.token_ids
            p = build_prompt([["Describe the image.", None]])
            sampled = m.generate([p, io["prompt"]], [image, None], max_gen_len=12,
                                 temperature=0.9, top_p=0.9, seed=7)
            result["sampled"] = [g.token_ids for g in sampled]
            result["encoded_views"] = encoded
            result["local_wq"] = list(m.transformer.layers[0].attention.wq.weight.shape)
            result["local_wk"] = list(m.transformer.layers[0].attention.wk.weight.shape)
            ffn = m.transformer.layers[0].feed_forward
            result["local_w1"] = list((ffn.w1 if m.cfg.n_experts else ffn.w1.weight).shape)
            torch.save(m.state_dict(), Path(out, f"rank{rank}.pt"))  # this rank's slice
    except Exception:
        result["crash"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    # every rank is done with the group before any tears it down: a rank that destroys it while a
    # peer still talks to it can abort that peer in gloo's threads (SIGABRT seen once in CI); a
    # crashed rank does not wait, as its peers may be stuck in another collective
    if "crash" not in result:
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, world = (int(a) for a in sys.argv[1:3])
    run(rank, world, *sys.argv[3:6])
