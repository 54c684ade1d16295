/// The requests a hub server has read and not yet finished, numbered in the order it read them
/// (SPEC.md §4, Barriers): what a `barrier` waits for. Thread-safe.
final class RequestLedger: @unchecked Sendable {
    private let lock = PthreadMutex()
    private let changed = ConditionVariable()
    private var next: UInt64 = 1
    private var unfinished: Set<UInt64> = []
    private var waiters = 0

    /// Numbers one request just read, in reading order.
    func admit() -> UInt64 {
        lock.withLock {
            let number = next
            next += 1
            unfinished.insert(number)
            return number
        }
    }

    /// A request answered, or dropped unrun.
    func finish(_ number: UInt64) {
        lock.withLock {
            unfinished.remove(number)
            if waiters > 0 { changed.broadcast() }
        }
    }

    /// Waits until no request numbered below `number` is unfinished; false at the deadline.
    func waitForEarlier(than number: UInt64, deadlineNs: UInt64) -> Bool {
        lock.withLock {
            waiters += 1
            defer { waiters -= 1 }
            while unfinished.contains(where: { $0 < number }) {
                if !changed.wait(lock, deadlineNs: deadlineNs) {
                    return !unfinished.contains(where: { $0 < number })
                }
            }
            return true
        }
    }

    /// How many requests are unfinished (tests).
    var unfinishedCount: Int { lock.withLock { unfinished.count } }
}

/// A count of threads with a bound (barrier threads). Thread-safe.
final class ThreadCount: @unchecked Sendable {
    private let lock = PthreadMutex()
    private var running = 0

    /// Counts one more thread if fewer than `limit` run; false otherwise.
    func startIfBelow(_ limit: Int) -> Bool {
        lock.withLock {
            guard running < limit else { return false }
            running += 1
            return true
        }
    }

    func end() { lock.withLock { running -= 1 } }
}
