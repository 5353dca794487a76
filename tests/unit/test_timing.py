"""Where each role's time goes: the clock, its totals in meta, the shares the learner reports."""
import pytest

from common.timing import PhaseClock, role_times, shares, time_table


class Meta:
    def __init__(self) -> None:
        self.fields: dict[str, str] = {}

    def incr_counter(self, name: str, n: int = 1) -> int:
        self.fields[name] = str(int(self.fields.get(name, 0)) + n)
        return int(self.fields[name])


def test_flush_writes_whole_milliseconds_and_keeps_the_rest():
    clock, meta = PhaseClock("sampler"), Meta()
    clock.add("sample", 0.0016)
    clock.add("push", 0.0004)
    clock.flush(meta)
    assert meta.fields == {"time_ms:sampler:sample": "1"}, "below a millisecond: nothing written yet"
    clock.add("sample", 0.0005)
    clock.add("push", 0.0007)
    clock.flush(meta)
    assert meta.fields == {"time_ms:sampler:sample": "2", "time_ms:sampler:push": "1"}
    clock.add("wait", -1.0)
    clock.flush(meta)
    assert "time_ms:sampler:wait" not in meta.fields, "a negative duration adds nothing"


def test_a_failed_write_keeps_the_time_for_the_next_flush():
    class Down(Meta):
        def incr_counter(self, name: str, n: int = 1) -> int:
            raise ConnectionError("redis is restarting")

    clock, meta = PhaseClock("reward"), Meta()
    clock.add("render", 2.5)
    with pytest.raises(ConnectionError):
        clock.flush(Down())
    clock.flush(meta)
    assert meta.fields == {"time_ms:reward:render": "2500"}


def test_phase_times_the_block_even_when_it_raises():
    clock, meta = PhaseClock("learner"), Meta()
    with pytest.raises(RuntimeError), clock.phase("update"):
        raise RuntimeError("non-finite")
    with clock.phase("update"):
        sum(range(100_000))
    clock.add("update", 0.01)
    clock.flush(meta)
    assert int(meta.fields["time_ms:learner:update"]) >= 10


def test_role_times_read_only_time_fields():
    meta = {"time_ms:reward:render": "1500", "time_ms:reward:read": "500", "time_ms:learner:update": "20",
            "added": "7", "stop": "0"}
    assert role_times(meta) == {"reward": {"render": 1.5, "read": 0.5}, "learner": {"update": 0.02}}


def test_shares_are_of_each_role_between_two_readings():
    before = {"reward": {"render": 1.0, "read": 1.0}}
    now = {"reward": {"render": 4.0, "read": 2.0, "store": 1.0}, "sampler": {"sample": 0.0}}
    out = shares(now, before)
    assert out == pytest.approx({"time/reward/render": 0.6, "time/reward/read": 0.2, "time/reward/store": 0.2})
    assert "time/sampler/sample" not in out, "a role with no time since the last reading reports nothing"


def test_the_report_table_lists_each_role_largest_phase_first():
    rows = time_table({"reward": {"render": 30.0, "read": 10.0}, "learner": {"update": 1.0}})
    assert rows[2:] == ["| learner | update | 1.0 | 100.0% |", "| reward | render | 30.0 | 75.0% |",
                        "| reward | read | 10.0 | 25.0% |"]
    assert "no phase times" in time_table({})[0]
