import Foundation
import WeftProto

/// The chunk objects each session wrote and has not committed (SPEC.md §9.1, §12.5): what a
/// discard may delete, and what goes when the session ends. Thread-safe.
public final class PendingUploads: @unchecked Sendable {
    private let lock = NSCondition()
    private var bySession: [SessionID: Set<SliceID>] = [:]
    /// Objects a commit under way claimed and has not applied yet (fsck must leave them).
    private var committing: Set<SliceID> = []

    public init() {}

    public func add(_ id: SliceID, session: SessionID) {
        lock.withLock { _ = bySession[session, default: []].insert(id) }
    }

    /// Removes those of `ids` that `session` holds; returns them (a discard takes the ones it
    /// may delete; a data hub forgets those reported committed).
    @discardableResult
    public func take(_ ids: some Sequence<SliceID>, session: SessionID) -> [SliceID] {
        lock.withLock { takeLocked(ids, session: session) }
    }

    /// `take` for a commit: the objects also count as held (`held(among:)`) until `endCommit`,
    /// so that nothing takes them for orphans between the claim and the change. First waits,
    /// up to `waitSeconds`, until no other commit under way has claimed any of `ids` (a retry
    /// of a commit still running waits for it: its objects may be on their way into its journal
    /// record, SPEC.md §5); ETIMEDOUT, with nothing taken, if one still has.
    public func takeForCommit(_ ids: [SliceID], session: SessionID, waitSeconds: Double) throws -> [SliceID] {
        let deadline = Date(timeIntervalSinceNow: waitSeconds)
        lock.lock()
        defer { lock.unlock() }
        while ids.contains(where: { committing.contains($0) }) {
            if !lock.wait(until: deadline), ids.contains(where: { committing.contains($0) }) {
                throw WeftError(ETIMEDOUT, "another commit under way still holds objects this commit names")
            }
        }
        let taken = takeLocked(ids, session: session)
        committing.formUnion(taken)
        return taken
    }

    private func takeLocked(_ ids: some Sequence<SliceID>, session: SessionID) -> [SliceID] {
        let taken = ids.compactMap { bySession[session]?.remove($0) }
        if bySession[session]?.isEmpty == true { bySession[session] = nil }
        return taken
    }

    /// The commit that claimed `ids` applied or failed (after any `giveBack`).
    public func endCommit(_ ids: [SliceID]) {
        guard !ids.isEmpty else { return }
        lock.withLock {
            committing.subtract(ids)
            lock.broadcast()
        }
    }

    /// Gives `ids` back to `session` (a commit that claimed them failed).
    public func giveBack(_ ids: [SliceID], session: SessionID) {
        guard !ids.isEmpty else { return }
        lock.withLock { bySession[session, default: []].formUnion(ids) }
    }

    /// Those of `ids` that some session holds.
    public func held(among ids: some Sequence<SliceID>) -> Set<SliceID> {
        lock.withLock {
            Set(ids.filter { id in committing.contains(id) || bySession.values.contains { $0.contains(id) } })
        }
    }

    /// Everything `session` still holds; it holds nothing after.
    public func end(_ session: SessionID) -> Set<SliceID> {
        lock.withLock { bySession.removeValue(forKey: session) } ?? []
    }
}
