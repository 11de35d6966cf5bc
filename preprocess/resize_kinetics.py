"""Kinetics (or any folder of videos) -> H.264 MP4s with a 256-pixel short side, for the training pipelines.

    python preprocess/resize_kinetics.py SRC DST [--short-side 256] [--fps F] [--workers N] [--keep-audio]

Every video under SRC (mp4, webm, mkv, avi, mov, ...) is written to the same relative path under DST with the
suffix .mp4: H.264 yuv420p, short side resized with the aspect kept and even sizes, constant frame rate (the
source's unless --fps), audio dropped unless --keep-audio (then AAC). A rerun skips complete outputs;
DST/settings.json records the options that shape them, and a rerun with other ones is refused (exit status 2).
DST/manifest.csv lists every output (path,frames,fps,width,height); DST/failures.txt lists the inputs that could
not be converted, with ffmpeg's error, and the exit status is then 1. Run it once per split (SRC/train ->
DST/train, ...): the pipelines read the manifest of each split folder.

Encoder defaults: a keyframe every 32 frames (ffmpeg's default is 250), x264 preset medium, crf 23, B-frames on.
A reader of a random clip (NVDEC, PyAV) decodes from the keyframe before it: against the default interval this
halves the cost of a 32-frame clip at stride 2 for 17% more bytes; for the paper's stride 8, whose clip spans most
of a 10-second Kinetics video, it saves 5% of the decoded frames. Measured by bench/bench_encode.py, figures and
reasons in bench/RESULTS.md ("Preprocess: encoder settings").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath

import ffmpeg

if __package__:
    from . import common
else:  # run as a script: python preprocess/resize_kinetics.py
    import common

# From bench/RESULTS.md: at stride 2, GOP 32 reads a random clip as fast as 8 or 16 (on CPU) and is 11-27% smaller;
# B-frames make files 8-12% smaller at no cost in clip time; preset fast is 3% bigger at equal quality, slow is 2%
# smaller for 1.5x the encoding time.
DEFAULT_GOP = 32
DEFAULT_PRESET = "medium"
DEFAULT_CRF = 23
DEFAULT_BFRAMES = 3  # x264's own default
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@dataclass(frozen=True)
class EncodeSettings:
    short_side: int = 256
    fps: Fraction | None = None  # None: keep the source's rate
    gop: int = DEFAULT_GOP  # frames between keyframes (ffmpeg -g)
    preset: str = DEFAULT_PRESET
    crf: int = DEFAULT_CRF
    bframes: int = DEFAULT_BFRAMES
    keep_audio: bool = False
    threads: int = 1  # per ffmpeg process; parallelism comes from the worker processes

    def output_settings(self) -> dict:
        """The options that shape the outputs, as JSON values (recorded in DST/settings.json): all but `threads`."""
        values = asdict(self)
        del values["threads"]
        values["fps"] = None if self.fps is None else str(self.fps)
        return values


def encode_command(source: Path, out: Path, rate: Fraction, settings: EncodeSettings) -> list[str]:
    """The ffmpeg command that writes `source` to `out` (any name: the format is given) at constant `rate`."""
    inp = ffmpeg.input(common.ffmpeg_path(source), threads=settings.threads)
    video = (inp["V:0"]  # capital V: the first real video stream, not a cover picture
             .filter("fps", fps=str(rate))
             .filter("scale", **common.scale_to_short_side(settings.short_side))
             .filter("setsar", 1))
    streams, audio_args = [video], {}
    if settings.keep_audio:
        streams.append(inp["a:0?"])  # "?": a video without audio is fine
        audio_args = {"c:a": "aac", "b:a": "128k"}
    output = ffmpeg.output(
        *streams, common.ffmpeg_path(out), f="mp4", pix_fmt="yuv420p", preset=settings.preset, crf=settings.crf,
        g=settings.gop, bf=settings.bframes, threads=settings.threads, movflags="+faststart",
        **{"c:v": "libx264"}, **audio_args)
    output = output.global_args(*common.FFMPEG_GLOBAL_ARGS)
    return ffmpeg.compile(output, overwrite_output=True)


def describe_mp4(path: Path, name: str) -> common.ManifestRow:
    """Manifest row of an MP4 this script wrote. Frames are counted from the packets (one per frame in H.264),
    which reads the file without decoding it."""
    out = common.run_command(["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_packets", "-show_entries",
                              "stream=nb_read_packets,r_frame_rate,width,height", "-of", "json",
                              common.ffmpeg_path(path)])
    streams = json.loads(out.stdout).get("streams")
    if not streams:
        raise common.PreprocessError(f"{path}: no video stream in the output")
    fields = streams[0]
    rate = common.parse_rate(fields["r_frame_rate"])
    if rate is None:
        raise common.PreprocessError(f"{path}: no frame rate in the output")
    return common.ManifestRow(name, int(fields["nb_read_packets"]), float(rate), int(fields["width"]),
                              int(fields["height"]))


@dataclass(frozen=True)
class Mp4Resizer:
    src: Path
    dst: Path
    settings: EncodeSettings

    def is_complete(self, output: Path) -> bool:
        return output.is_file() and output.stat().st_size > 0

    def describe(self, task: common.Task) -> common.ManifestRow:
        return describe_mp4(self.dst / task.output, task.output)

    def convert(self, task: common.Task) -> common.ManifestRow:
        source, final = self.src / task.source, self.dst / task.output
        info = common.probe_source(source)
        rate = self.settings.fps or info.rate
        if rate is None:
            raise common.PreprocessError("the file gives no frame rate; pass --fps")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = common.temp_path(final)  # ends in .tmp-<pid>, not .mp4: the format is given with -f mp4
        try:
            proc = common.run_command(encode_command(source, tmp, rate, self.settings))
            row = describe_mp4(tmp, task.output)
            common.check_not_truncated(row.frames, common.written_seconds(proc.stdout), info.duration, proc.stderr)
            common.commit_file(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return row


def output_name(source: str) -> str:
    """'a/b.webm' -> 'a/b.mp4'."""
    return str(PurePosixPath(source).with_suffix(".mp4"))


def _frame_rate_arg(text: str) -> Fraction:
    rate = common.parse_rate(text)
    if rate is None:
        raise argparse.ArgumentTypeError(f"not a positive frame rate: {text!r}")
    return rate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="folder of videos, searched recursively")
    parser.add_argument("dst", type=Path, help="output folder (same relative paths, .mp4)")
    parser.add_argument("--short-side", type=int, default=256, help="short side in pixels, even (default 256)")
    parser.add_argument("--fps", type=_frame_rate_arg, default=None,
                        help="resample to this constant rate, e.g. 30 or 30000/1001 (default: the source's)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel videos (default: all cores)")
    parser.add_argument("--threads", type=int, default=1, help="threads per ffmpeg process (default 1)")
    parser.add_argument("--gop", type=int, default=DEFAULT_GOP,
                        help=f"frames between keyframes (default {DEFAULT_GOP})")
    parser.add_argument("--preset", default=DEFAULT_PRESET, choices=X264_PRESETS,
                        help=f"x264 preset (default {DEFAULT_PRESET})")
    parser.add_argument("--crf", type=int, default=DEFAULT_CRF, help=f"x264 quality, 0-51 (default {DEFAULT_CRF})")
    parser.add_argument("--bframes", type=int, default=DEFAULT_BFRAMES,
                        help=f"x264 B-frames between references (default {DEFAULT_BFRAMES})")
    parser.add_argument("--keep-audio", action="store_true", help="keep the first audio track, as AAC")
    common.add_shard_arguments(parser)
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"SRC is not a folder: {args.src}")
    if args.src.resolve() == args.dst.resolve():
        parser.error(f"DST must differ from SRC: {args.dst}")
    if args.short_side <= 0 or args.short_side % 2:
        parser.error(f"--short-side must be a positive even number, got {args.short_side}")
    for name in ("workers", "threads", "gop"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.crf <= 51:
        parser.error(f"--crf must be in 0..51, got {args.crf}")
    if args.bframes < 0:
        parser.error(f"--bframes must be at least 0, got {args.bframes}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = EncodeSettings(short_side=args.short_side, fps=args.fps, gop=args.gop, preset=args.preset,
                              crf=args.crf, bframes=args.bframes, keep_audio=args.keep_audio, threads=args.threads)
    converter = Mp4Resizer(args.src, args.dst, settings)
    if args.merge_only:  # reads DST only: no need to walk SRC
        return common.merge_shards(converter, args.dst)
    sources = common.find_videos(args.src, exclude=args.dst)
    if not sources:
        print(f"warning: no video files under {args.src}", file=sys.stderr)
    tasks = [common.Task(source, output_name(source)) for source in sources]
    return common.run_tasks(converter, tasks, args.dst, args.workers, desc="resize",
                            settings=settings.output_settings(), shard=args.shard)


if __name__ == "__main__":
    sys.exit(main())
