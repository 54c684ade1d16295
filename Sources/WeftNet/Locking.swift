#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A pthread mutex with a stable address, usable with `ConditionVariable`.
final class PthreadMutex: @unchecked Sendable {
    let raw: UnsafeMutablePointer<pthread_mutex_t>

    init() {
        raw = .allocate(capacity: 1)
        raw.initialize(to: pthread_mutex_t())
        let rc = pthread_mutex_init(raw, nil)
        precondition(rc == 0, "pthread_mutex_init failed: \(rc)")
    }

    deinit {
        pthread_mutex_destroy(raw)
        raw.deallocate()
    }

    @inline(__always) func lock() { pthread_mutex_lock(raw) }
    @inline(__always) func unlock() { pthread_mutex_unlock(raw) }

    @inline(__always) func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock()
        defer { unlock() }
        return try body()
    }
}

/// A pthread condition variable whose timed waits use the monotonic clock, so that a wall-clock
/// step never shortens or stretches a timeout.
final class ConditionVariable: @unchecked Sendable {
    let raw: UnsafeMutablePointer<pthread_cond_t>

    init() {
        raw = .allocate(capacity: 1)
        raw.initialize(to: pthread_cond_t())
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        #if os(Linux)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        #endif
        let rc = pthread_cond_init(raw, &attributes)
        pthread_condattr_destroy(&attributes)
        precondition(rc == 0, "pthread_cond_init failed: \(rc)")
    }

    deinit {
        pthread_cond_destroy(raw)
        raw.deallocate()
    }

    /// Waits until signalled or until the monotonic clock reaches `deadlineNs`; `mutex` must be held.
    /// Returns false once the deadline has passed. Spurious wake-ups return true: callers re-check.
    func wait(_ mutex: PthreadMutex, deadlineNs: UInt64) -> Bool {
        #if os(Linux)
        if MonotonicClock.nowNs() >= deadlineNs { return false }
        var until = timespec(tv_sec: Int(deadlineNs / 1_000_000_000), tv_nsec: Int(deadlineNs % 1_000_000_000))
        return pthread_cond_timedwait(raw, mutex.raw, &until) != ETIMEDOUT
        #else
        let now = MonotonicClock.nowNs()
        if now >= deadlineNs { return false }
        let remaining = deadlineNs - now
        var relative = timespec(tv_sec: Int(remaining / 1_000_000_000), tv_nsec: Int(remaining % 1_000_000_000))
        return pthread_cond_timedwait_relative_np(raw, mutex.raw, &relative) != ETIMEDOUT
        #endif
    }

    func signal() { pthread_cond_signal(raw) }
    func broadcast() { pthread_cond_broadcast(raw) }
}

/// Nanoseconds of the monotonic clock (the clock `ConditionVariable` waits on).
enum MonotonicClock {
    static func nowNs() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }

    static func deadlineNs(afterMs milliseconds: Int) -> UInt64 {
        nowNs() &+ UInt64(max(0, milliseconds)) &* 1_000_000
    }
}
