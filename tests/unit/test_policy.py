from migrator.migration.policy import Convergence, Limits, RoundStats

MiB = 1 << 20


def stats(r, dirty_mib, bw_mib=100.0, elapsed=1.0):
    return RoundStats(round=r, dirty_bytes=int(dirty_mib * MiB),
                      sent_bytes=0, seconds=1.0, elapsed_s=elapsed,
                      bandwidth=bw_mib * MiB)


def test_switches_when_prediction_fits_budget():
    c = Convergence(Limits(downtime_ms=100))
    assert not c.after_round(stats(1, 500)).switch       # 5 s predicted
    v = c.after_round(stats(2, 5))                        # 50 ms predicted
    assert v.switch and "fits" in v.reason


def test_switches_when_dirty_set_stops_shrinking():
    c = Convergence(Limits(downtime_ms=10))
    assert not c.after_round(stats(1, 400)).switch
    assert not c.after_round(stats(2, 200)).switch       # shrinking
    assert not c.after_round(stats(3, 195)).switch       # stalled once
    v = c.after_round(stats(4, 199))                      # stalled twice
    assert v.switch and "stopped shrinking" in v.reason


def test_limits():
    c = Convergence(Limits(downtime_ms=1, max_rounds=3))
    for r in (1, 2):
        assert not c.after_round(stats(r, 1000 - r * 200)).switch
    assert "max-rounds" in c.after_round(stats(3, 300)).reason
    c = Convergence(Limits(downtime_ms=1, max_time_s=5))
    assert "max-time" in c.after_round(stats(1, 1000, elapsed=6)).reason


def test_zero_bandwidth_never_fits():
    c = Convergence(Limits(downtime_ms=1000))
    assert not c.after_round(stats(1, 1, bw_mib=0)).switch


def test_nothing_dirty_always_fits():
    c = Convergence(Limits(downtime_ms=1))
    assert c.after_round(stats(1, 0, bw_mib=0)).switch
