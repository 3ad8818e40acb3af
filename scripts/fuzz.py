"""Coverage-guided fuzzing (atheris, i.e. libFuzzer) of the code that parses client bytes.

Targets, each run without a server:
- `codec`: serving.codec.decode_image on arbitrary bytes (Pillow's Python plugins and ours
  instrumented; the C decoders run but are not coverage-guided);
- `v2`: a KServe V2 ModelInferRequest built from the fuzzer's bytes, through the gRPC
  converter (serving.grpc.inference.infer_request) and serving.v2.input_rows (what
  ModelInfer does before ORT).

An InvalidInput is the expected answer to bad bytes. Anything else is a crash: another
exception type, a result of the wrong shape or dtype, a run over -timeout (a hang) or over
-rss_limit_mb. libFuzzer stops at the first crash and writes it to runs/fuzz/artifacts/; this
driver records it and restarts the target until its time is spent.

    python scripts/fuzz.py --seconds 120 --out runs/fuzz/fuzz.json   # every target in turn
    python scripts/fuzz.py --target codec -- CORPUS_DIR -runs=1000   # one target, libFuzzer args
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("codec", "v2")
TIMEOUT_S = 10  # one input taking longer than this is a hang
RSS_LIMIT_MB = 2048


# ----------------------------------------------------------------------------- targets
def _codec_target() -> Callable[[bytes], None]:
    from serving.codec import decode_image
    from serving.contract import InputSpec
    from serving.errors import InvalidInput

    specs = (InputSpec(1, 28, 28), InputSpec(3, 32, 32))

    def one_input(data: bytes) -> None:
        spec = specs[len(data) % 2]
        try:
            arr = decode_image(data, spec)
        except InvalidInput:
            return
        assert arr.shape == spec.shape and arr.dtype.name == "uint8", (arr.shape, arr.dtype)

    return one_input


def _v2_target() -> Callable[[bytes], None]:
    import atheris

    from serving.contract import InputSpec
    from serving.errors import InvalidInput
    from serving.grpc.inference import infer_request
    from serving.proto.inference import grpc_predict_v2_pb2 as v2
    from serving.v2 import input_rows

    spec = InputSpec(1, 4, 4)
    datatypes = ["UINT8", "FP32", "INT64", "BYTES", "FP16", ""]

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        request = v2.ModelInferRequest()
        for _ in range(fdp.ConsumeIntInRange(0, 2)):
            t = request.inputs.add(
                name="images" if fdp.ConsumeBool() else fdp.ConsumeUnicodeNoSurrogates(8),
                datatype=fdp.PickValueInList(datatypes)
                if fdp.ConsumeBool()
                else fdp.ConsumeUnicodeNoSurrogates(6),
            )
            if fdp.ConsumeBool():  # the right shape but for the batch size, often enough
                t.shape.extend([fdp.ConsumeIntInRange(-2, 10), *spec.shape])
            else:
                for _ in range(fdp.ConsumeIntInRange(0, 6)):
                    big = fdp.ConsumeBool()
                    t.shape.append(
                        fdp.ConsumeIntInRange(*((-(2**63), 2**63 - 1) if big else (-1, 8)))
                    )
            n = fdp.ConsumeIntInRange(0, 64)
            kind = fdp.ConsumeIntInRange(0, 3)
            pixels = fdp.ConsumeBool()  # values a valid image has, or anything
            if kind == 1:
                top = 255 if pixels else 2**32 - 1
                t.contents.uint_contents.extend(fdp.ConsumeIntListInRange(n, 0, top))
            elif kind == 2:
                floats = fdp.ConsumeFloatListInRange(n, 0.0, 255.0) if pixels else None
                t.contents.fp32_contents.extend(floats or fdp.ConsumeFloatList(n))
            elif kind == 3:
                t.contents.int64_contents.extend(fdp.ConsumeIntListInRange(n, -(2**63), 2**63 - 1))
        for _ in range(fdp.ConsumeIntInRange(0, 2)):
            request.raw_input_contents.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256)))
        try:
            rows = input_rows(infer_request(request), spec, max_images=8)
        except InvalidInput:
            return
        assert rows.shape[1:] == spec.shape and rows.dtype.name == "uint8", rows.shape

    return one_input


def run_target(name: str, libfuzzer_args: list[str]) -> None:
    """Fuzz one target in this process (libFuzzer owns the loop and exits)."""
    import atheris

    with atheris.instrument_imports(include=["PIL", "serving"]):
        target = {"codec": _codec_target, "v2": _v2_target}[name]()
    atheris.Setup([sys.argv[0], *libfuzzer_args], target)
    atheris.Fuzz()


# ----------------------------------------------------------------------------- seeds
def _seeds(name: str) -> dict[str, bytes]:
    if name == "v2":  # FuzzedDataProvider input: libFuzzer's own start is as good as any
        return {}
    import numpy as np
    from PIL import Image

    def enc(img: Image.Image, fmt: str, **kw: object) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    px = np.random.default_rng(0).integers(0, 256, (12, 10), dtype=np.uint8)
    grey = Image.fromarray(px)
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [grey.convert("RGB"), Image.fromarray(255 - px).convert("RGB")]
    pal = grey.convert("P")
    return {
        "grey.png": enc(grey, "PNG"),
        "rgba.png": enc(grey.convert("RGBA"), "PNG"),
        "palette-trns.png": enc(pal, "PNG", transparency=0),
        "i16.png": enc(Image.fromarray(px.astype(np.uint16) * 257), "PNG"),
        "rgb.jpg": enc(grey.convert("RGB"), "JPEG"),
        "cmyk.jpg": enc(grey.convert("CMYK"), "JPEG"),
        "exif6.jpg": enc(grey, "JPEG", exif=exif),
        "anim.gif": enc(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "anim.webp": enc(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "rgb.bmp": enc(grey.convert("RGB"), "BMP"),
        "apng.png": enc(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "grey-trns.png": enc(grey, "PNG", transparency=7),
        "la.png": enc(grey.convert("LA"), "PNG"),
        "bilevel.png": enc(grey.convert("1"), "PNG"),
        "progressive.jpg": enc(grey.convert("RGB"), "JPEG", progressive=True),
        "rgba.webp": enc(grey.convert("RGBA"), "WEBP"),
        "palette.bmp": enc(pal, "BMP"),
        "trns.gif": enc(pal, "GIF", transparency=0),
    }


# ----------------------------------------------------------------------------- driver
def fuzz(name: str, seconds: float, workdir: Path) -> dict[str, object]:
    """Run one target for `seconds` (restarting after each crash); its figures."""
    corpus, artifacts = workdir / "corpus" / name, workdir / "artifacts" / name
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    for fname, data in _seeds(name).items():
        (corpus / fname).write_bytes(data)
    before = set(artifacts.iterdir())
    executions, runs, coverage, peak_rss = 0, 0, 0, 0
    start = time.monotonic()
    while (left := seconds - (time.monotonic() - start)) > 1:
        proc = subprocess.run(
            [sys.executable, __file__, "--target", name, "--", str(corpus),
             f"-max_total_time={int(left)}", f"-timeout={TIMEOUT_S}",
             f"-rss_limit_mb={RSS_LIMIT_MB}", f"-artifact_prefix={artifacts}/",
             "-print_final_stats=1"],
            cwd=ROOT, capture_output=True, text=True, errors="replace",
        )  # fmt: skip
        runs += 1
        (workdir / f"{name}-{runs}.log").write_text(proc.stderr)
        stats = re.findall(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
        done = re.findall(r"Done (\d+) runs", proc.stderr)
        execs = re.findall(r"#(\d+)\s", proc.stderr)
        executions += int((stats or done or execs or ["0"])[-1])
        coverage = max([coverage, *map(int, re.findall(r"\scov: (\d+)", proc.stderr))])
        rss = re.findall(r"stat::peak_rss_mb:\s*(\d+)", proc.stderr)
        peak_rss = max([peak_rss, *map(int, rss)])
        if proc.returncode == 0:
            break
    crashes = sorted(str(p) for p in set(artifacts.iterdir()) - before)
    return {
        "target": name,
        "seconds": round(time.monotonic() - start, 1),
        "executions": executions,
        "crashes": len(crashes),
        "crash_files": crashes,
        "corpus_size": len(list(corpus.iterdir())),
        "coverage_edges": coverage,  # libFuzzer's cov: of instrumented Python (PIL, serving)
        "peak_rss_mb": peak_rss,
        "libfuzzer_runs": runs,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=TARGETS, help="run one target in-process")
    p.add_argument("--seconds", type=float, default=120.0, help="time per target")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "fuzz")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "fuzz" / "fuzz.json")
    args, rest = p.parse_known_args()
    if args.target:
        run_target(args.target, [a for a in rest if a != "--"])
        return 0
    results = []
    for name in TARGETS:
        result = fuzz(name, args.seconds, args.workdir)
        print(json.dumps(result), flush=True)
        results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"targets": results}, indent=2) + "\n")
    return 1 if any(r["crashes"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
