"""The saved search index beside an embedding database: what makes query.py start fast.

Reading a 100,000-row text database costs seconds (parsing) and a FAISS IVF index costs
more (k-means). Both are derived from the database file, so query.py keeps them in a
folder beside it and reuses them while the database is unchanged::

    train_embedding.txt.index/
        key.json        what the folder was built from (written last: no key, no index)
        emb.npy         float32 [N, d], opened with np.load(mmap_mode="r") (no parse, no copy)
        rows.json       {"paths": [...relative to the database's folder], "labels": [...]}
        ivf-<key>-nlist<L>-seed<S>.faiss   FAISS indexes (--ann faiss), one per setting

The key is every database file's (data, companions) size, mtime and inode plus the model
fingerprint of the database's record: an edited, regenerated or updated database
(update_database.py) has another key, and the folder is rebuilt on the next query. A
FAISS file's name carries the key, so a file built for an older database never matches.
The folder can be deleted at any time; where it cannot be written (a read-only
database), query.py works as before, from the file, with a warning.

key.json also records the saved arrays' sizes, mtimes and a SHA-256 of their content (of the
whole file up to ``DIGEST_WHOLE_BYTES``; above, of its header, its end and ``DIGEST_BLOCKS``
evenly spaced blocks): an index damaged in place, even with its size and mtime kept, is rebuilt
with a warning instead of answering with wrong or NaN distances.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from deepranking import embedding_io
from deepranking.cli import UserError, warn
from deepranking.file_io import atomic_path, atomic_write_text

KEY_FORMAT = "deep-ranking-saved-index"
KEY_VERSION = 3  # 3: key.json holds the saved arrays' digests; 2: the inode is part of the key
FOLDER_SUFFIX = ".index"
SAVED_FILES = ("emb.npy", "rows.json")
DIGEST_WHOLE_BYTES = 16 << 20  # files up to this size are hashed whole (~10 ms for 16 MiB)
DIGEST_BLOCKS = 256  # a larger file: its first and last 1 MiB and this many 64 KiB blocks between
_HEAD_BYTES, _BLOCK_BYTES = 1 << 20, 1 << 16


def index_dir(database: str | os.PathLike) -> Path:
    """``<database>.index/`` beside the database file."""
    return Path(str(database) + FOLDER_SUFFIX)


def database_key(database: str | os.PathLike, record: dict | None) -> dict:
    """What a saved index must match: each file's size, mtime and inode, and the model id.

    The inode changes whenever a file is replaced atomically (gen_embeddings.py, update_database.py),
    so a rewrite of the same size within one tick of a coarse file-system clock is still noticed.
    """
    files = []
    for p in embedding_io.files_of(database):
        if p.exists():
            st = p.stat()
            files.append([p.name, st.st_size, st.st_mtime_ns, st.st_ino])
    model = (record or {}).get("model")
    return {"format": KEY_FORMAT, "version": KEY_VERSION, "files": files,
            "model": model.get("id") if model else None}


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def database_id(database: str | os.PathLike) -> str:
    """A short id of a database file as it is now (key_hash of database_key): what an index
    built from it elsewhere (query.py --index) records, to be reused only while it matches."""
    return key_hash(database_key(database, embedding_io.read_record(database)[0]))


def faiss_path(folder: Path, key: dict, nlist: int, seed: int) -> Path:
    return folder / f"ivf-{key_hash(key)}-nlist{nlist}-seed{seed}.faiss"


def _load(folder: Path, key: dict, database: Path) -> embedding_io.Embeddings | None:
    """The saved database when the folder's key matches ``key`` and its arrays are as saved; None otherwise."""
    try:
        # the saved files' sizes and mtimes as _save left them: an index edited or damaged since is rebuilt
        saved = json.loads((folder / "key.json").read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or {k: saved.get(k) for k in ("key", "files")} != _key_record(key, folder):
            return None
        rows_text = (folder / "rows.json").read_bytes()
        digests = {"emb.npy": content_digest(folder / "emb.npy"), "rows.json": hashlib.sha256(rows_text).hexdigest()}
        if saved.get("digests") != digests:
            warn(f"the saved search index {folder} is not what was saved there (damaged since?): rebuilding it")
            return None
        emb = np.load(folder / "emb.npy", mmap_mode="r", allow_pickle=False)
        rows = json.loads(rows_text.decode("utf-8"))
    except (OSError, ValueError):
        return None
    paths, labels = (rows.get("paths"), rows.get("labels")) if isinstance(rows, dict) else (None, None)
    if not (isinstance(paths, list) and isinstance(labels, list) and all(isinstance(p, str) for p in paths)):
        return None
    if emb.ndim != 2 or emb.dtype != np.float32 or not (len(paths) == len(labels) == len(emb)):
        return None
    base = database.resolve().parent
    return embedding_io.Embeddings([os.path.normpath(os.path.join(base, p)) for p in paths],
                                   np.array(labels, dtype=object), emb)


def content_digest(path: Path) -> str:
    """SHA-256 of ``path``'s content: all of it up to DIGEST_WHOLE_BYTES, else its first and last MiB
    and DIGEST_BLOCKS evenly spaced blocks (a damaged .npy header or any sampled row changes it;
    reading costs milliseconds whatever the size)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= DIGEST_WHOLE_BYTES:
            while block := f.read(1 << 22):
                h.update(block)
            return h.hexdigest()
        step = (size - 2 * _HEAD_BYTES) // (DIGEST_BLOCKS + 1)
        spans = [(0, _HEAD_BYTES), *((_HEAD_BYTES + i * step, _BLOCK_BYTES) for i in range(1, DIGEST_BLOCKS + 1)),
                 (size - _HEAD_BYTES, _HEAD_BYTES)]
        for offset, length in spans:
            f.seek(offset)
            h.update(f.read(length))
    return h.hexdigest()


def _save(folder: Path, key: dict, db: embedding_io.Embeddings, database: Path) -> None:
    """(Re)build the folder: the old key goes first, the new key last."""
    folder.mkdir(exist_ok=True)
    (folder / "key.json").unlink(missing_ok=True)
    for old in folder.glob("ivf-*.faiss*"):  # and their .key files
        old.unlink(missing_ok=True)
    with atomic_path(folder / "emb.npy", suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(db.emb, dtype=np.float32))
    base = database.resolve().parent
    rows = {"paths": [os.path.relpath(p, base) for p in db.paths], "labels": [str(x) for x in db.labels]}
    atomic_write_text(folder / "rows.json", json.dumps(rows))
    record = {**_key_record(key, folder), "digests": {name: content_digest(folder / name) for name in SAVED_FILES}}
    atomic_write_text(folder / "key.json", json.dumps(record, sort_keys=True) + "\n")


def _key_record(key: dict, folder: Path) -> dict:
    """key.json's first part: the database's key, and {name: [size, mtime_ns]} of the saved arrays as
    _save left them (a stat each: a changed database or a rewritten array costs no reading)."""
    files = {name: [(st := os.stat(folder / name)).st_size, st.st_mtime_ns] for name in SAVED_FILES}
    return {"key": key, "files": files}


class SavedDatabase:
    """A database opened through its saved index.

    db: Embeddings (``emb`` memory-mapped when the index was reused or built here)
    status: "reused", "built", or "unsaved" (the folder could not be written; read from the file)
    folder, key: where the index lives and what it was keyed on (folder None when unsaved)
    """

    def __init__(self, db: embedding_io.Embeddings, status: str, folder: Path | None, key: dict):
        self.db, self.status, self.folder, self.key = db, status, folder, key

    def faiss_path(self, nlist: int, seed: int) -> Path | None:
        return None if self.folder is None else faiss_path(self.folder, self.key, nlist, seed)


def open_database(database: str | os.PathLike, progress: bool = False) -> SavedDatabase:
    """Open an embedding database through ``<database>.index/``: reuse it if it fits, else build it.

    Raises UserError for a missing or malformed database, as embedding_io.read_embeddings.
    """
    database = Path(database)
    record, note = embedding_io.read_record(database)
    key = database_key(database, record)
    folder = index_dir(database)
    saved = _load(folder, key, database)
    if saved is not None:
        saved.record, saved.record_note = record, note
        return SavedDatabase(saved, "reused", folder, key)
    db = embedding_io.read_embeddings(database, progress=progress)
    # read_embeddings checked the record against the rows; the key holds the model it found
    key = database_key(database, db.record)
    try:
        _save(folder, key, db, database)
    except (OSError, UserError) as exc:
        warn(f"cannot save the search index beside {database} ({exc}); every query will read the file")
        return SavedDatabase(db, "unsaved", None, key)
    reopened = _load(folder, key, database)
    if reopened is None:  # the database changed while we read it: use what we read
        return SavedDatabase(db, "built", folder, key)
    reopened.record, reopened.record_note = db.record, db.record_note
    return SavedDatabase(reopened, "built", folder, key)
