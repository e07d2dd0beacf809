"""Export a dataset's splits as an ImageFolder tree, for tools that want one folder per class.

    python -m fgvc.data.export --dataset cub200 --data-dir ~/data/CUB_200_2011 --format imagefolder --out ~/cub-folders

OUT/train, OUT/val and OUT/test each hold one folder per class; train and val are fgvc's own split (the same
data.val_fraction and data.split_seed as training), so a tool that selects on OUT/val never sees test. Class folders
keep the class names where those are safe file names that sort in class order (CUB's "001.Black_footed_Albatross");
otherwise they are "<index>_<name>" with "/" replaced ("F/A-18" -> "017_F-A-18"), and OUT/classes.txt maps each
folder to its class name. Files are the original image files (hard links where possible, else copies, or symbolic
links on request), so FGVC-Aircraft's credit banner is still in them. The tree is built beside OUT and renamed into
place when complete.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fgvc.build import build_dataset
from fgvc.config import DataConfig, load_config
from fgvc.errors import FGVCError, OptionError, OutputExists, command

EXPORT_SPLITS = ("train", "val", "test")
MODES = ("link", "copy", "symlink")


def class_folders(classes: Sequence[str]) -> list[str]:
    safe = [re.sub(r"[/\\\0]", "-", name).strip() for name in classes]
    usable = all(name and name not in (".", "..") for name in safe)
    if usable and len(set(safe)) == len(safe) and sorted(safe) == safe:
        return safe
    width = len(str(len(classes) - 1))
    return [f"{i:0{width}d}_{name}" for i, name in enumerate(safe)]


def export_imagefolder(cfg: DataConfig, out: str | os.PathLike, *, mode: str = "link",
                       echo: Callable[[str], None] = print) -> Path:
    if mode not in MODES:
        raise OptionError("mode", f"{mode!r} is unknown; choose one of {', '.join(MODES)}")
    out = Path(out).expanduser()
    if out.exists():
        raise OutputExists(f"{out} already exists; choose a new folder")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        folders = None
        for split in EXPORT_SPLITS:
            dataset = build_dataset(cfg, split)
            folders = folders or class_folders(dataset.classes)
            for index in range(len(dataset)):
                source = dataset.image_path(index)
                if source is None:
                    raise FGVCError(f"{cfg.dataset} is held in memory by torchvision; there are no files to export")
                folder = staging / split / folders[int(dataset.targets[index])]
                folder.mkdir(parents=True, exist_ok=True)
                _place(Path(source), _free_name(folder, Path(source).name), mode)
            echo(f"{split}: {len(dataset)} images")
        (staging / "classes.txt").write_text(
            "".join(f"{folder} {name}\n" for folder, name in zip(folders, dataset.classes, strict=True)))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(staging, out)
    return out


def _free_name(folder: Path, name: str) -> Path:
    """`name` in `folder`, or name-1, name-2, ... when two source files share a base name."""
    target, stem, suffix, n = folder / name, Path(name).stem, Path(name).suffix, 1
    while target.exists():
        target, n = folder / f"{stem}-{n}{suffix}", n + 1
    return target


def _place(source: Path, target: Path, mode: str) -> None:
    if mode == "symlink":
        target.symlink_to(source.resolve())
        return
    if mode == "link":
        try:
            os.link(source, target)
            return
        except OSError:  # another filesystem, or links not supported: copy instead
            pass
    shutil.copy2(source, target)


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgvc.data.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--format", required=True, choices=("imagefolder",))
    parser.add_argument("--out", required=True, help="the folder to create")
    parser.add_argument("--mode", default="link", choices=MODES,
                        help="link: hard links where possible, else copies (default)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="data settings, e.g. data.val_fraction=0.2")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(None, args.overrides, {"dataset": args.dataset, "data_dir": args.data_dir})
    out = export_imagefolder(cfg.data, args.out, mode=args.mode)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
