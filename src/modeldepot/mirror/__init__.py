"""Mirror mode: a file the store lacks is pulled through the source chain while it is being read.

A reader asks for a byte range of a file at a revision. If the store has the file, the bytes come from
the store. If not, one pull of that file starts (or is joined: every reader of the same file shares it)
and the reader follows the partial file as chunks land, each chunk handed out once it is written and,
from a depot node, checked against the node's BLAKE3. The last chunk of a response that ends at the file's
end, or that holds a chunk no node's digest vouched for (a Hub source's), is held back until the whole file
has matched the upstream's SHA-256 (or git oid): a reader never receives a complete response that is wrong;
if the check fails, the stream breaks instead. (A range inside the file whose every chunk a node vouched
for goes as its chunks land: a header read of a big file must not wait for all of it.) The pull runs to its
end even if every reader leaves, so the next reader finds the file in the store.

A chunk slow to land (a slow upstream: 16 MiB take 16 s at 1 MiB/s, and four chunks at once share the link) is
followed as its bytes come, after AHEAD_PATIENCE, so that a client's read timeout never waits for a whole
chunk; those bytes are unproven, as a Hub source's, and once the chunk lands what went out is compared with
it (checked against its digest, or, the Hub's, by the whole file's check): a difference (a source that lied
and was replaced, a transfer that started over) breaks the answer. A client that left before that check has
its bytes checked later, and the file noted broken only if they are refuted; until then a resume of the file
waits, then is asked to retry (a 429).

A broken response may have handed out bytes the check then refuted, and a client resumes: huggingface_hub
asks for ``Range: bytes=N-`` and joins the answer to what it holds. So a file whose response broke after
sending unvouched bytes, or whose pull failed after any reader had such bytes of it (a client that left
earlier resumes too), is :meth:`Mirror.broke <modeldepot.mirror.pulls.Mirror.broke>` for a while: a resume (``bytes=N-``) is answered whole, and
huggingface_hub starts the file over. A closed range (``bytes=a-b``, HfFileSystem's reads) is answered as
asked: a client takes a 200 for the range it asked for. The node remembers these files in its home
(:mod:`modeldepot.mirror.marks`), so that a client resuming after the node restarted is answered whole too,
with what each broken answer sent: once the store holds the file, a resume by commit has that checked
against it, and answered as asked when all of it is the file's (:meth:`Mirror.proven_by_store`).

The upstream is untrusted in time as well as in content: requests share one scan per (repo, revision), run
on threads of their own; a request the store could answer waits for it a few seconds (HELD_PATIENCE), and
a pull that failed before a chunk landed, or a scan no upstream answered, answers its failure for FAILED_TTL
instead of being tried again by every retry of every client.

The modules: :mod:`~modeldepot.mirror.pulls` (:class:`Mirror`: the pulls and their responses),
:mod:`~modeldepot.mirror.following` (a response following a pull as it lands), :mod:`~modeldepot.mirror.scans`
(the upstream's scans), :mod:`~modeldepot.mirror.marks` (the files whose answers broke).
"""

from modeldepot.mirror.pulls import Mirror

__all__ = ["Mirror"]
