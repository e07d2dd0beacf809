"""Self-supervised pretraining: learn a backbone from unlabeled images, then hand its weights on.

    python -m fgvc.pretrain                                    # SimCLR on synthbirds, the CPU recipe
    python -m fgvc.pretrain --method byol --eval linear --eval knn
    python -m fgvc.pretrain --method moco --dataset cub200 --data-dir ~/data/CUB_200_2011 --model resnet50
    python -m fgvc.pretrain --method dino ssl.local_crops_on_parts=true   # DINO, local crops on the birds' parts
    python -m fgvc.pretrain --method mae                       # masked autoencoder (a ViT, its CPU recipe)
    python -m fgvc.pretrain --resume runs/<run>                # continue an interrupted run exactly
    torchrun --nproc-per-node 4 -m fgvc.pretrain ...           # negatives gathered from every rank

Only training images are seen (the train split; trainval with ssl.include_val=true), and their labels never: the
k-NN monitor (after every epoch, on val) and --eval read labels, the loss does not. The run folder's
backbone.safetensors is what `python -m fgvc.train model.pretrained_file=...` (any head, any transfer.mode) and
`python -m fgvc.evaluate --knn --pretrained-file ...` load. Without --config, synthbirds' CPU recipe
(configs/synthbirds/pretrain.yaml; pretrain_dino.yaml and pretrain_mae.yaml for --method dino and mae) applies;
elsewhere the schema defaults, the papers' (shared/REFERENCE.md).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fgvc.build import SSL_EVALUATIONS, build_preprocessing, with_preprocessing
from fgvc.config import pretrain_recipes, to_yaml
from fgvc.engine.distributed import is_main_process
from fgvc.engine.pretraining import pretrain
from fgvc.engine.trainer import RunResult
from fgvc.errors import command
from fgvc.train import resolve, run_parser


def format_results(result: RunResult) -> str:
    results = result.results
    lines = [f"pretrained {results['method']} for {results['steps']} steps in {result.seconds:.0f} s; backbone "
             f"weights: {result.run_dir / results['backbone_file']}"]
    evaluations = results["evaluations"]
    if "knn" in evaluations:
        lines.append(f"k-NN (k {evaluations['knn']['k']}) test top-1 {evaluations['knn']['top1']:.2f}%")
    if "linear" in evaluations:
        linear = evaluations["linear"]
        val = f"val {linear['val']['top1']:.2f}%; " if linear["val"] is not None else ""  # data.val_fraction=0: none
        lines.append(f"linear probe test top-1 {linear['test']['top1']:.2f}% ({val}{linear['run_dir']})")
    lines += ["next:", f"  python -m fgvc.train model.pretrained_file={result.run_dir / results['backbone_file']} "
                       "model.backbone=<the same>"]
    return "\n".join(lines)


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = run_parser("python -m fgvc.pretrain", __doc__)
    parser.add_argument("--method", help="ssl.method: simclr, moco, byol, simsiam, dino, mae (dino and mae: ViTs)")
    parser.add_argument("--eval", action="append", choices=SSL_EVALUATIONS,
                        help="ssl.eval: after pretraining, a linear probe (linear) or the weighted k-NN (knn) on the "
                             "test split; repeat for both")
    args = parser.parse_intermixed_args(argv)
    if args.eval:
        args.overrides.append(f"ssl.eval=[{','.join(args.eval)}]")
    cfg = resolve(args, pretrain_recipes(args.method))
    if args.print_config:
        print(to_yaml(with_preprocessing(cfg, build_preprocessing(cfg))), end="")
        return 0
    result = pretrain(cfg, resume_dir=args.resume)
    if result.completed and is_main_process():
        print(format_results(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
