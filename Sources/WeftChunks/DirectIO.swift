#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CWeftSupport
import Logging

/// O_DIRECT of this platform.
let O_DIRECT = weft_o_direct_flag()

/// Whether a store uses O_DIRECT for aligned transfers. Starts as configured; the first refusal
/// by the file system (EINVAL: tmpfs, some network file systems) turns it off for good, with
/// one log line, and every transfer goes through the page cache from then on.
final class DirectIOSwitch: @unchecked Sendable {
    private let lock = Lock()
    private var enabled: Bool
    private var reads: UInt64 = 0
    private var writes: UInt64 = 0

    init(enabled: Bool) {
        self.enabled = enabled
    }

    var isEnabled: Bool { lock.withLock { enabled } }

    func countRead() { lock.withLock { reads += 1 } }
    func countWrite() { lock.withLock { writes += 1 } }

    var counters: DirectIOCounters {
        lock.withLock { DirectIOCounters(enabled: enabled, reads: reads, writes: writes) }
    }

    func refused(_ reason: String, logger: Logger) {
        let wasEnabled: Bool = lock.withLock {
            defer { enabled = false }
            return enabled
        }
        if wasEnabled { logger.notice("direct I/O unavailable, using the page cache: \(reason)") }
    }
}

/// What a store did with O_DIRECT so far: whether it is still on, and how many object writes
/// and block-run reads bypassed the page cache.
public struct DirectIOCounters: Sendable, Equatable {
    public var enabled: Bool
    public var reads: UInt64
    public var writes: UInt64

    public init(enabled: Bool, reads: UInt64, writes: UInt64) {
        self.enabled = enabled
        self.reads = reads
        self.writes = writes
    }
}
