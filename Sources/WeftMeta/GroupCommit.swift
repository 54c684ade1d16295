import Foundation
import WeftProto

/// Shares log syncs (the metadata journal's fdatasync) between concurrent mutations.
///
/// Each mutation writes its batch without sync and takes a sequence number. `waitDurable(seq)`
/// returns once a sync covering `seq` has completed: one caller leads a sync for everything
/// applied so far, the others wait for it. `beforeSync` runs first in every sync, so that chunk
/// data referenced by metadata is on disk before the metadata is.
final class GroupCommit: @unchecked Sendable {
    private let condition = NSCondition()
    private var appliedSeq: UInt64 = 0
    private var durableSeq: UInt64 = 0
    private var syncing = false
    private let syncLog: () throws -> Void
    var beforeSync: (() throws -> Void)?

    init(syncLog: @escaping () throws -> Void) {
        self.syncLog = syncLog
    }

    /// The latest mutation whose reply promises durability (namespace changes, fsync commits).
    private var promisedSeq: UInt64 = 0

    /// Records one applied mutation; returns its sequence number. `promised` marks a mutation
    /// whose caller will be told it is durable.
    func applied(promised: Bool) -> UInt64 {
        condition.lock()
        defer { condition.unlock() }
        appliedSeq += 1
        if promised { promisedSeq = appliedSeq }
        return appliedSeq
    }

    var latestApplied: UInt64 {
        condition.lock()
        defer { condition.unlock() }
        return appliedSeq
    }

    /// Everything a reader may observe that was promised durable: a read waits for this, not for
    /// commits that never promised durability (close/flush data commits).
    var latestPromised: UInt64 {
        condition.lock()
        defer { condition.unlock() }
        return promisedSeq
    }

    func waitDurable(_ seq: UInt64) throws {
        condition.lock()
        defer { condition.unlock() }
        while durableSeq < seq {
            if syncing {
                condition.wait()
                continue
            }
            syncing = true
            let target = appliedSeq
            condition.unlock()
            var failure: Error?
            do {
                try beforeSync?()
                try syncLog()
            } catch {
                failure = error
            }
            condition.lock()
            syncing = false
            if failure == nil { durableSeq = max(durableSeq, target) }
            condition.broadcast()
            if let failure { throw failure }
        }
    }

    /// Makes everything applied so far durable.
    func syncAll() throws {
        try waitDurable(latestApplied)
    }
}
