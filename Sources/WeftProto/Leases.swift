#if canImport(Glibc)
import Glibc
#endif

/// Lease timing shared by hubs and agents (SPEC.md §12.6).
public enum Leases {
    /// A home counts a holder's leases void this long after it last heard from the holder.
    public static let periodNs: UInt64 = 6_000_000_000
    /// An agent counts its own leases void this long after the send time of the last ping its
    /// home answered: `periodNs` less a margin that covers the kernel's 1 s cache timeouts.
    public static let agentValidityNs: UInt64 = 4_000_000_000

    /// Nanoseconds of the monotonic clock.
    public static func nowNs() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }
}

/// The agent end of a session's leases, as the home sees it (SPEC.md §12.6).
///
/// In-process it is the agent's VFS itself; over the network it is the server's proxy for the
/// connection, which sends `recall` frames and waits for their answers.
public protocol LeaseClient: AnyObject, Sendable {
    /// Recalls the session's lease on `ino`. The holder commits the inode's buffered writes,
    /// drops its cached attributes, layout and pages, invalidates the kernel's copies (and, for a
    /// directory, the kernel's entries `names`), then returns true. False if it could not be
    /// reached before `deadlineNs` (monotonic).
    ///
    /// With `notice` the holder holds nothing yet: a reply about `ino` is on its way to it while
    /// a change of `ino` is under way, and it must not cache that reply. A notice is never waited
    /// for, and must be delivered before that reply.
    func recall(_ ino: InodeID, names: [[UInt8]], notice: Bool, deadlineNs: UInt64) -> Bool
    /// Monotonic time the holder was last heard from.
    var lastHeardNs: UInt64 { get }
    /// Agent side only: every lease of the session is void (the connection was lost, or the home
    /// has not answered for too long). Drop every cache they covered.
    func leasesLost()
    /// Agent side only: files whose writes this agent buffered under a write lease it then lost
    /// (the connection ended), to reclaim on the next connection before anything else.
    func reclaimableWriteLeases() -> [InodeID]
    /// Agent side only: the outcome of reclaiming the write lease on `ino`.
    func writeLeaseReclaimed(_ ino: InodeID, granted: Bool)
    /// Whether the holder outlives its hub's process (a remote agent does; an agent inside the
    /// hub's own process does not). A hub restarted after a crash while such holders had leases
    /// keeps a grace period (SPEC.md §12.6).
    var survivesHubRestart: Bool { get }
}

extension LeaseClient {
    public func reclaimableWriteLeases() -> [InodeID] { [] }
    public func writeLeaseReclaimed(_ ino: InodeID, granted: Bool) {}
    public var survivesHubRestart: Bool { true }
}
