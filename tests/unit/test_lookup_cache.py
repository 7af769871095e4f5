"""The bounded key-lookup cache of emp_tasks.auth."""

from __future__ import annotations

from emp_tasks.auth import LookupCache, Principal

ALICE = Principal(customer_id="alice", admin=False, key_id="k1")


def test_a_recent_lookup_is_answered_from_the_cache():
    cache = LookupCache(max_entries=2, ttl_s=60)
    cache.put("a", ALICE)
    cache.put("b", None)
    assert cache.get("a") == (True, ALICE)
    assert cache.get("b") == (True, None)
    assert cache.get("c") == (False, None)


def test_the_least_recently_used_entry_is_dropped_first():
    cache = LookupCache(max_entries=2, ttl_s=60)
    cache.put("a", ALICE)
    cache.put("b", None)
    cache.get("a")
    cache.put("c", None)
    assert len(cache) == 2
    assert cache.get("b") == (False, None)
    assert cache.get("a") == (True, ALICE)


def test_many_distinct_keys_leave_the_cache_at_its_bound():
    cache = LookupCache(max_entries=100, ttl_s=60)
    for number in range(10_000):
        cache.put(f"unknown-{number}", None)
    assert len(cache) == 100


def test_an_expired_entry_is_a_miss_and_is_dropped():
    cache = LookupCache(max_entries=10, ttl_s=0)
    cache.put("a", ALICE)
    assert cache.get("a") == (False, None)
    assert len(cache) == 0
