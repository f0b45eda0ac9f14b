"""The battery's report: one result per check, by name, and the error a failed battery raises."""

from dataclasses import dataclass, field


class ConformanceError(AssertionError):
    """A plugin failed the battery; the message is the whole report."""


@dataclass
class Result:
    check: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    target: str
    results: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failures(self) -> list:
        return [r for r in self.results if not r.ok]

    def add(self, check, ok, detail=""):
        self.results.append(Result(check, ok, detail))

    def __str__(self):
        lines = [f"{'PASS' if self.ok else 'FAIL'} {self.target} ({self.seconds:.1f}s)"]
        for r in self.results:
            lines.append(f"  [{'ok' if r.ok else 'FAIL'}] {r.check}" + (f": {r.detail}" if r.detail else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
