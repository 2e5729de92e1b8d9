"""Getting an assigned fragment onto local disk, verified.

Fragments are cached by model, fragment name and weights hash, so a restarted node (or several
nodes on one machine) reuses what is already there; downloads go to a temporary directory that is
renamed into place only after every hash matched. Hashing runs in a worker thread: a node fetching
a new span while it serves the old one must keep forwarding activations meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
from pathlib import Path

import aiohttp

from engine.errors import CoordinatorError, FragmentError
from engine.fragments.manifest import MANIFEST, WEIGHTS, Manifest, verify_files

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def cache_path(cache_dir: Path, manifest: Manifest) -> Path:
    return cache_dir / "fragments" / manifest.model_id / f"{manifest.name}-{manifest.files[WEIGHTS].sha256[:16]}"


async def fetch_fragment(session: aiohttp.ClientSession, base_url: str, manifest: Manifest, cache_dir: Path) -> Path:
    """Return a local directory holding the verified fragment, downloading it if needed."""
    final = cache_path(cache_dir, manifest)
    if final.is_dir():
        try:
            await asyncio.to_thread(verify_files, final, manifest)
            log.info("fragment %s found in cache at %s", manifest.name, final)
            return final
        except FragmentError as exc:
            log.warning("cached fragment is bad (%s); downloading again", exc)
            shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        for name in manifest.files:
            url = base_url.rstrip("/") + "/" + name
            try:
                async with session.get(url) as resp:
                    if resp.status != 200:
                        raise CoordinatorError(f"fetching {url} failed: HTTP {resp.status}")
                    with (tmp / name).open("wb") as f:
                        async for block in resp.content.iter_chunked(_CHUNK):
                            f.write(block)
            except aiohttp.ClientError as exc:
                raise CoordinatorError(f"fetching {url} failed: {exc}") from None
        await asyncio.to_thread(verify_files, tmp, manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2), encoding="utf-8")
        try:
            tmp.rename(final)
        except OSError:  # another process on this machine finished the same fragment first
            shutil.rmtree(tmp, ignore_errors=True)
            await asyncio.to_thread(verify_files, final, manifest)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
