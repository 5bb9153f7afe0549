"""The Hugging Face cache, both ways: adopting what huggingface_hub downloaded into the store, and making a
repo of the store appear in the cache so that an unmodified ``hf_hub_download``, ``snapshot_download`` or
``from_pretrained`` finds it offline.

The cache's layout (huggingface_hub's ``file_download.py``)::

    <cache>/models--<org>--<name>/
    ├── blobs/<etag>                 one file per content, named by the Hub's ETag for it: the SHA-256 for
    │                                LFS files, the git blob id (SHA-1 of "blob <size>\\0" + bytes) otherwise
    ├── blobs/<etag>[.<8 hex>].incomplete   a download under way, or one that was killed
    ├── snapshots/<commit>/<path>    relative links to ../../blobs/<etag> (one more ../ per folder in <path>)
    └── refs/<branch>                the commit a branch (main, refs/pr/1) stood at: 40 hex digits

**Import** (:func:`import_hf_cache`) walks that layout itself: ``huggingface_hub.scan_cache_dir`` drops a
whole repo on the first broken link, and an import should keep the rest. Every blob is read once and
checked against its name (SHA-256, or git blob id) while the store computes its own digests; then each
snapshot becomes a revision of the same commit id and each ref a ref of the store, through the store's
one commit path (:func:`modeldepot.store.publish.publish`: a kill or an error leaves each revision wholly
in or wholly out). What cannot be verified is reported and skipped, the rest imported: a blob whose bytes
do not match its name (and the files that use it), an ``.incomplete`` download, a link to a missing blob,
a link that leads out of the repo's ``blobs/`` or out of the cache (refused: it is never read), a ref that
names no snapshot, a name the store refuses, a folder that cannot be read (another user's in a shared cache:
its repo, or the files of a snapshot in it).

A blob is **hard-linked** into the store when the cache is on the store's file system (and the file is the
user's own): no byte is copied, and the store and the cache share one inode, which the import makes
read-only (0444) as every blob of the store is. That is safe because huggingface_hub never writes a blob
in place: a download writes an ``.incomplete`` file and renames it over the blob, and deleting a revision
(``hf cache delete``) unlinks names; either leaves the store's name, and bytes, as they were. What could
still change the shared bytes is a writer that ignores the mode (root) or a disk that rots: the store
checks every chunk it sends against its BLAKE3, and its scrub and ``verify`` quarantine such a blob (the
cache's name keeps the damaged bytes it had anyway). Across file systems, or with ``copy``, the bytes
are copied. The import never writes to the cache otherwise.

**Export** (:func:`export_to_hf_cache`) writes ``blobs/<etag>`` as a hard link to the store's blob when
they share a file system (else a copy, each chunk checked against its BLAKE3 on the way), never a symlink
into the store, whose blob files ``rm`` and ``gc`` delete; then ``snapshots/<commit>/<path>`` as relative
links, exactly as huggingface_hub makes them, and ``refs/<branch>`` last. Each name appears by an atomic
rename of a finished file, and a snapshot the cache does not hold yet is built beside ``snapshots/`` (in
``.modeldepot-<pid>-<hex>.snap/<commit>``, at the same depth) and renamed into place whole; what is added to a
snapshot it holds, and every blob added, is written first in a journal (``.modeldepot-<pid>-<hex>.added``).
So a kill leaves nothing the cache would name as the commit, and the next export takes back what a killed
one (its process gone) left. A ``.no_exist/<commit>/<path>`` note of huggingface_hub's for a file written
is removed: ``try_to_load_from_cache`` reads it before the snapshot. The tree
listing huggingface_hub caches (``trees/<commit>.json``) is not written: the store may hold only part of
a revision (one variant), and that listing would tell later online downloads that the rest does not exist.
"""

from modeldepot.hfcache.adopt import import_hf_cache
from modeldepot.hfcache.cache import (
    ORIGIN,
    HfCacheExportResult,
    HfCacheImportResult,
    HfCacheProblem,
    HfCacheRepo,
    HfCacheRevision,
    default_cache_dir,
    repo_folder_name,
)
from modeldepot.hfcache.export import export_to_hf_cache

__all__ = [
    "ORIGIN",
    "HfCacheExportResult",
    "HfCacheImportResult",
    "HfCacheProblem",
    "HfCacheRepo",
    "HfCacheRevision",
    "default_cache_dir",
    "export_to_hf_cache",
    "import_hf_cache",
    "repo_folder_name",
]
