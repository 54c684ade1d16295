import Foundation
import WeftProto

/// The locks of one volume, held at its home hub (SPEC.md §12.6 Locks): POSIX byte-range locks
/// and flock locks, owned by (session, kernel lock owner). Volatile: a hub restart drops them.
///
/// Guarantees: POSIX locks of one owner merge, split and change type like fcntl(2) (a new lock
/// replaces the owner's overlapping ranges); two owners conflict when their ranges overlap and
/// either is a write lock; flock locks are whole-file, one per owner, and conflict the same way;
/// POSIX and flock locks never conflict with each other (as on Linux); a session's locks go
/// when the session ends. Thread-safe.
final class LockTable: @unchecked Sendable {
    struct Held: Equatable {
        var session: SessionID
        var owner: UInt64
        var kind: LockKind
        var type: LockType
        var start: UInt64
        var end: UInt64
        var pid: UInt32

        func overlaps(_ start: UInt64, _ end: UInt64) -> Bool { self.start <= end && start <= self.end }
    }

    private let lock = NSLock()
    private var held: [InodeID: [Held]] = [:]

    /// Applies `request` for `session` on inode `ino`. A test returns the first conflicting lock
    /// (or `.none`); a set returns `.none` when granted and throws EAGAIN on a conflict.
    func apply(session: SessionID, ino: InodeID, _ request: LockRequest) throws -> LockDescription {
        guard request.start <= request.end else { throw WeftError(EINVAL, "lock range ends before it starts") }
        return try lock.withLock {
            var locks = held[ino] ?? []
            let mine = { (h: Held) in h.session == session && h.owner == request.owner && h.kind == request.kind }
            let (start, end) = request.kind == .flock ? (UInt64(0), UInt64.max) : (request.start, request.end)
            if request.type != .unlock {
                let conflict = locks.first { other in
                    !mine(other) && other.kind == request.kind && other.overlaps(start, end)
                        && (other.type == .write || request.type == .write)
                }
                if let conflict {
                    if request.test { return LockDescription(type: conflict.type, start: conflict.start, end: conflict.end,
                                                             pid: conflict.pid) }
                    throw WeftError(EAGAIN, "the range is locked by another owner")
                }
            }
            if request.test { return .none }
            // Remove this owner's overlapping ranges (keeping the parts outside), then add.
            var kept: [Held] = []
            for h in locks {
                guard mine(h), h.overlaps(start, end) else {
                    kept.append(h)
                    continue
                }
                if h.start < start { kept.append(Held(session: h.session, owner: h.owner, kind: h.kind, type: h.type,
                                                      start: h.start, end: start - 1, pid: h.pid)) }
                if h.end > end { kept.append(Held(session: h.session, owner: h.owner, kind: h.kind, type: h.type,
                                                  start: end + 1, end: h.end, pid: h.pid)) }
            }
            locks = kept
            if request.type != .unlock {
                var new = Held(session: session, owner: request.owner, kind: request.kind, type: request.type,
                               start: start, end: end, pid: request.pid)
                // Merge with adjacent or overlapping ranges of the same owner and type.
                locks.removeAll { h in
                    guard mine(h), h.type == new.type,
                          h.end == .max || h.end + 1 >= new.start, new.end == .max || new.end + 1 >= h.start else { return false }
                    new.start = min(new.start, h.start)
                    new.end = max(new.end, h.end)
                    return true
                }
                locks.append(new)
            }
            held[ino] = locks.isEmpty ? nil : locks
            return .none
        }
    }

    /// Drops every lock of `session` (the agent left or died).
    func release(session: SessionID) {
        lock.withLock {
            for (ino, locks) in held {
                let kept = locks.filter { $0.session != session }
                held[ino] = kept.isEmpty ? nil : kept
            }
        }
    }

    /// Locks held now, for tests and status.
    func locks(on ino: InodeID) -> [Held] {
        lock.withLock { held[ino] ?? [] }
    }
}
