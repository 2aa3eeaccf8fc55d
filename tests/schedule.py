"""`make test`'s xdist schedule: whole files, in tests/conftest.py's order, and never a long file behind a long test.

xdist's `--dist loadfile` gives a worker its next file once the worker holds two tests or fewer that have not ended:
a worker runs a test only when it knows the next one (its teardown depends on it), so the last test of a file waits
for the next file to be given, and that file then waits for as long as the last test runs. Behind the ActiveSync
Ping (a file of one test that holds its worker 310 s) xdist put the head of the queue at the start of the run: the
file that provisions the AD realm, which every other AD file then waited for, started after 322 s instead of at once
(a fresh clone's `make test`, December 2026). The same happened behind the bench's smoke run (one test, 85-125 s).

`LongFilesFirst` keeps xdist's rule but for one case: a worker left with a single test to run (its next test,
whose length the controller cannot know) is given the queue's last file, one of the quick unit files, which can
wait; the head of the queue, where the long files are, goes to the next worker that is about to run out. Nothing else
changes: the same files, whole, once each.
"""

from __future__ import annotations

from xdist.scheduler import LoadFileScheduling  # type: ignore[import-untyped]  # xdist has no type information
from xdist.workermanage import WorkerController  # type: ignore[import-untyped]

# The files that drive a container engine (image builds, compose labs, both engines' iptables rules, Podman's
# netavark) run on one worker one after the other, as one unit of the queue. On four workers, where they start
# together at the head of the queue, a Podman gateway once found its KDC unreachable (a 503 `kdc_unavailable` in a quiet
# fresh clone, December 2026; not explained further): one engine at a time takes that overlap away.
ONE_ENGINE_AT_A_TIME = frozenset(
    f"tests/integration/{name}.py" for name in ("test_compose", "test_compose_ad", "test_podman")
)
CONTAINER_ENGINES = "tests/integration/(container engines)"


class LongFilesFirst(LoadFileScheduling):  # type: ignore[misc]  # (an untyped base)
    """`--dist loadfile`, but a worker whose one remaining test may be long gets the queue's tail, not its head, and
    the files in `ONE_ENGINE_AT_A_TIME` are one unit."""

    def _split_scope(self, nodeid: str) -> str:
        scope = str(super()._split_scope(nodeid))
        return CONTAINER_ENGINES if scope in ONE_ENGINE_AT_A_TIME else scope

    def _reschedule(self, node: WorkerController) -> None:
        if not node.shutting_down and len(self.workqueue) > 1 and self._pending_of(self.assigned_work[node]) == 1:
            self.workqueue.move_to_end(next(reversed(self.workqueue)), last=False)  # the tail goes next
        super()._reschedule(node)
