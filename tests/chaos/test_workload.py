"""The chaos workload's own bookkeeping (no stack): what the checks after the
faults ask of it must stay cheap at a full run's size (60,000+ sends)."""

from __future__ import annotations

from pathlib import Path

from chaos.checker import EntryKind
from chaos.workload import Workload, WorkloadConfig, _Send


def _send(sender: str, cmid: str, kind: int = EntryKind.MESSAGE) -> _Send:
    return _Send(sender, "d1", cmid, "d:u00:u01", "s1", 0, 0.0, b"x", kind=kind)


def test_the_kind_index_is_built_once_per_new_send_even_with_repeated_keys(
    tmp_path: Path,
) -> None:
    """A resend keeps its client_msg_id, so keys repeat among the sends. The
    index of kinds by (sender, client_msg_id) was rebuilt from every send
    whenever its size differed from the number of sends, that is on every call
    once a key repeated: `recipients()` for each of N sends then cost N^2 (a full
    `make chaos` spent minutes per quiesce poll, past its deadline)."""
    w = Workload(WorkloadConfig(), [], lambda user, device: "", tmp_path)
    w.sends += [_send("u00", "a"), _send("u00", "a"), _send("u01", "b", EntryKind.READ)]
    first = w._kinds()
    assert w._kinds() is first  # nothing new: the same index, not a rebuild
    assert first == {("u00", "a"): EntryKind.MESSAGE, ("u01", "b"): EntryKind.READ}
    w.sends.append(_send("u00", "c", EntryKind.RECALL))
    assert w._kinds()[("u00", "c")] == EntryKind.RECALL
    # A later send with a repeated key wins, as the rebuilt index had it.
    w.sends.append(_send("u00", "a", EntryKind.EDIT))
    assert w._kinds()[("u00", "a")] == EntryKind.EDIT
    w.members["d:u00:u01"] = frozenset({"u00", "u01"})
    assert w.recipients("d:u00:u01", "u00", "a") == frozenset({"u00", "u01"})
