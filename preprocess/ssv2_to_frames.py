"""Something-Something v2 WebM videos -> one JPEG per decoded frame, the layout the SSv2 pipeline reads.

    python preprocess/ssv2_to_frames.py SRC DST [--workers N] [--quality Q] [--short-side S]

Each SRC/<id>.webm becomes DST/<id>/<id>_000000.jpeg, <id>_000001.jpeg, ... numbered from 0, one file per
decoded frame (no frame is dropped or repeated to even out the timing). A video's folder appears only once all
its frames are written. A rerun skips complete folders; DST/settings.json records --quality and --short-side,
and a rerun with other ones is refused (exit status 2). DST/manifest.csv lists every folder
(path = <id>, frames = JPEG files, fps of the source, width, height); DST/failures.txt lists the inputs that
could not be converted, with ffmpeg's error, and the exit status is then 1.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath

import ffmpeg
from PIL import Image

if __package__:
    from . import common
else:  # run as a script: python preprocess/ssv2_to_frames.py
    import common


def frame_name(video_id: str, index: int) -> str:
    return f"{video_id}_{index:06d}.jpeg"


def extract_command(source: Path, folder: Path, video_id: str, quality: int, short_side: int | None,
                    threads: int) -> list[str]:
    """The ffmpeg command that writes every decoded frame of `source` as `folder/<id>_%06d.jpeg` from 0."""
    video = ffmpeg.input(common.ffmpeg_path(source), threads=threads)["V:0"]
    if short_side:
        video = video.filter("scale", **common.scale_to_short_side(short_side)).filter("setsar", 1)
    # '%' is special in image2 patterns, in the folders above as well as in the id (DST "runs/100%")
    pattern = os.path.join(common.ffmpeg_path(folder), f"{video_id}_").replace("%", "%%") + "%06d.jpeg"
    output = ffmpeg.output(
        video, pattern, f="image2", start_number=0, pix_fmt="yuvj420p", threads=threads,
        # one image per decoded frame: passthrough neither drops nor duplicates frames of variable-rate videos
        # (-vsync, not -fps_mode, which ffmpeg before 5.1 does not know)
        vsync="passthrough", **{"c:v": "mjpeg", "q:v": quality})
    output = output.global_args(*common.FFMPEG_GLOBAL_ARGS)
    return ffmpeg.compile(output, overwrite_output=True)


@dataclass(frozen=True)
class FrameExtractor:
    src: Path
    dst: Path
    quality: int
    short_side: int | None
    threads: int

    def is_complete(self, output: Path) -> bool:
        return output.is_dir()  # renamed into place only when complete

    def describe(self, task: common.Task) -> common.ManifestRow:
        info = common.probe_source(self.src / task.source)
        return self._row(task.output, self.dst / task.output, info.rate, info.duration)

    def convert(self, task: common.Task) -> common.ManifestRow:
        source, final = self.src / task.source, self.dst / task.output
        info = common.probe_source(source)
        tmp = common.temp_path(final)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            proc = common.run_command(
                extract_command(source, tmp, task.output, self.quality, self.short_side, self.threads))
            seconds = common.written_seconds(proc.stdout)
            row = self._row(task.output, tmp, info.rate, seconds)
            common.check_not_truncated(row.frames, seconds, info.duration, proc.stderr)
            # Frames are not fsynced one by one (millions of files): atomic against a killed run, not a power cut.
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return row

    @staticmethod
    def _row(video_id: str, folder: Path, rate: Fraction | None, seconds: float | None) -> common.ManifestRow:
        """Frames = JPEG files in `folder`; fps = the source's rate (frames are not resampled)."""
        frames = sum(1 for name in os.listdir(folder) if name.endswith(".jpeg"))
        if frames == 0:
            raise common.PreprocessError("no frame decoded")
        rate = common.frames_per_second(rate, frames, seconds)
        if rate is None:
            raise common.PreprocessError("the file gives no frame rate")
        with Image.open(folder / frame_name(video_id, 0)) as first:
            width, height = first.size
        return common.ManifestRow(video_id, frames, float(rate), width, height)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="folder of <id>.webm files")
    parser.add_argument("dst", type=Path, help="output folder: one <id>/ folder of JPEGs per video")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel videos (default: all cores)")
    parser.add_argument("--threads", type=int, default=1, help="threads per ffmpeg process (default 1)")
    parser.add_argument("--quality", type=int, default=2,
                        help="JPEG quality as ffmpeg's -q:v, 2 (best) to 31 (smallest) (default 2)")
    parser.add_argument("--short-side", type=int, default=None,
                        help="resize the short side to this many pixels, aspect kept (default: keep the size)")
    common.add_shard_arguments(parser)
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"SRC is not a folder: {args.src}")
    if args.src.resolve() == args.dst.resolve():
        parser.error(f"DST must differ from SRC: {args.dst}")
    if not 2 <= args.quality <= 31:
        parser.error(f"--quality must be in 2..31, got {args.quality}")
    if args.short_side is not None and args.short_side < 2:
        parser.error(f"--short-side must be at least 2, got {args.short_side}")
    for name in ("workers", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extractor = FrameExtractor(args.src, args.dst, args.quality, args.short_side, args.threads)
    if args.merge_only:  # reads DST only: no need to walk SRC
        return common.merge_shards(extractor, args.dst)
    sources = common.find_videos(args.src, recursive=False)
    if not sources:
        print(f"warning: no video files in {args.src}", file=sys.stderr)
    tasks = [common.Task(source, PurePosixPath(source).stem) for source in sources]
    return common.run_tasks(extractor, tasks, args.dst, args.workers, desc="frames",
                            settings={"quality": args.quality, "short_side": args.short_side}, shard=args.shard)


if __name__ == "__main__":
    sys.exit(main())
