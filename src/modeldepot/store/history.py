"""A commit's history as the store can tell it: the commits listed from it, newest first.

An import's commit names its branch's head as its parent (``importer._commit_on``), and its id is the git
id of that commit object: the parent is found again among the repo's revisions as the one that gives the
id (a root gives it alone), so no column holds it. (Imports made before they had parents are roots by
their ids: each one's history is itself.) A commit whose parent cannot be told (a pulled commit: the store keeps no commit object of the Hub's; a
parent removed since) is followed by the repo's older revisions by the time they came (what the store
knew of it before imports had parents): "came here earlier" then stands for "reachable".
"""

from __future__ import annotations

from modeldepot.gitobjects import commit_id_for_tree
from modeldepot.store.store import Store

__all__ = ["commit_history"]


def commit_history(store: Store, repo_id: str, commit_id: str) -> list[tuple[str, float]]:
    """(commit id, when it came) of ``commit_id`` and the commits before it, newest first."""
    rows = store.index.read(
        "SELECT commit_id, tree_oid, created_at FROM revisions WHERE repo_id = ? "
        "ORDER BY created_at DESC, commit_id",
        (repo_id,),
    )
    came = {row["commit_id"]: float(row["created_at"]) for row in rows}
    trees = {row["commit_id"]: row["tree_oid"] for row in rows}
    listed: list[str] = []
    current: str | None = commit_id
    while current is not None and current in came and current not in listed:
        listed.append(current)
        tree = trees[current]
        if tree is None:  # (pulled: no tree of ours, no parent to tell)
            break
        if commit_id_for_tree(tree) == current:
            return [(c, came[c]) for c in listed]  # a root: the history is whole
        # (the parent came before its child: those first, the one just before it most likely)
        before = [c for c in came if came[c] <= came[current] and c not in listed]
        after = [c for c in came if came[c] > came[current] and c not in listed]
        current = next((c for c in (*before, *after) if commit_id_for_tree(tree, c) == current), None)
    # Not told further: the older revisions, by the time they came
    last = came[listed[-1]] if listed else float("inf")
    older = [c for c in came if c not in listed and came[c] <= last]
    return [(c, came[c]) for c in (*listed, *older)]
