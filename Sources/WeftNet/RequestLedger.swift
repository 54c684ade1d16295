import WeftProto

/// The commits a hub server has read and not yet finished, per agent and inode, numbered in
/// the order it read them (SPEC.md §4, Barriers): what a `barrier` waits for. Thread-safe.
final class RequestLedger: @unchecked Sendable {
    struct Key: Hashable {
        /// The agent name its session gave (the same across a reconnect).
        var agent: String
        var ino: InodeID
    }

    private let lock = PthreadMutex()
    private let changed = ConditionVariable()
    private var next: UInt64 = 1
    /// Unfinished commits' numbers per key, in ascending order (admitted in order).
    private var unfinished: [Key: [UInt64]] = [:]
    /// Barriers waiting per key: only a finish of such a key wakes them.
    private var waiting: [Key: Int] = [:]

    /// Numbers one request just read, in reading order; a commit (`key`) is tracked until
    /// `finish`.
    func admit(_ key: Key?) -> UInt64 {
        lock.withLock {
            let number = next
            next += 1
            if let key { unfinished[key, default: []].append(number) }
            return number
        }
    }

    /// A commit answered, or dropped unrun.
    func finish(_ number: UInt64, key: Key?) {
        guard let key else { return }
        lock.withLock {
            guard var numbers = unfinished[key], let index = numbers.firstIndex(of: number) else { return }
            numbers.remove(at: index)
            unfinished[key] = numbers.isEmpty ? nil : numbers
            if waiting[key] != nil { changed.broadcast() }
        }
    }

    /// Waits until no commit of `key` numbered below `number` is unfinished; false at the deadline.
    func waitForEarlier(than number: UInt64, key: Key, deadlineNs: UInt64) -> Bool {
        lock.withLock {
            func earlierRuns() -> Bool { (unfinished[key]?.first ?? UInt64.max) < number }
            guard earlierRuns() else { return true }
            waiting[key, default: 0] += 1
            defer {
                waiting[key]! -= 1
                if waiting[key] == 0 { waiting[key] = nil }
            }
            while earlierRuns() {
                if !changed.wait(lock, deadlineNs: deadlineNs) { return !earlierRuns() }
            }
            return true
        }
    }
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
