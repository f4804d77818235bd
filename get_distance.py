"""Print the Euclidean distance between the embeddings of two images.

    python get_distance.py --model runs/deepranknet.model --image1 a.jpg --image2 b.jpg
    0.734512

As the classic Keras tool did: one number on stdout, 0 for identical embeddings
and at most 2 (embeddings are unit vectors). Smaller means more similar.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deepranking import cli, file_io


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint written by train_net.py")
    p.add_argument("--image1", type=Path, required=True, help="first image")
    p.add_argument("--image2", type=Path, required=True, help="second image")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def main(args) -> None:
    from deep_rank_net import model_from_checkpoint
    from deepranking import retrieval, runtime
    from deepranking.checkpoint import load_checkpoint
    from deepranking.embedding import embed_paths

    paths = [str(file_io.check_input_file(p, f"image{i}").resolve()) for i, p in
             enumerate((args.image1, args.image2), start=1)]
    device = runtime.pick_device(args.device)
    model, spec = model_from_checkpoint(load_checkpoint(args.model), device)
    # The checkpoint's decode -> resize -> embed path, as gen_embeddings.py, so the number matches
    # the distance between the two images' rows in an embedding file.
    emb = embed_paths(paths, model, spec, batch_size=2, device=device, progress=False)  # [2, D]
    print(f"{retrieval.pair_distance(emb[0], emb[1]):.6f}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
