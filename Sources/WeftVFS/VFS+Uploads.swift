#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftProto

/// Uploads of buffered writes as chunk objects, and what a failed commit leaves behind
/// (SPEC.md §7 and §9.1): the objects an attempt wrote are discarded when its commit was not
/// applied, a file that no longer exists drops its buffers, and background retries back off.
extension VFS {
    /// Writes `extents` of chunk `index` as new objects; the slices that commit them, in order.
    /// Every object id it tried to write is appended to `written`, so that a caller whose
    /// attempt fails can discard them (a failed write leaves no object; an id the hub does not
    /// hold is ignored there).
    func upload(_ extents: [Extent], of index: UInt32, context: RequestContext,
                written: inout [SliceID]) throws -> [SliceCommit] {
        var commits: [SliceCommit] = []
        commits.reserveCapacity(extents.count)
        for extent in extents {
            let id = try nextSliceID(context)
            written.append(id)
            try hub.writeSlice(context, id: id, bytes: extent.buffer.bytes)
            let length = UInt32(extent.buffer.count)
            commits.append(SliceCommit(chunkIndex: index, slice: Slice(id: id, offsetInChunk: extent.offsetInChunk,
                                                                       length: length, objectLength: length)))
        }
        return commits
    }

    /// Asks the hub to delete objects `ids`, written for a commit that was not applied. Best
    /// effort: what it cannot delete goes when the session ends (SPEC.md §12.5).
    func discard(_ ids: [SliceID], context: RequestContext) {
        guard !ids.isEmpty, hubDiscards.load(ordering: .relaxed) else { return }
        var start = 0
        while start < ids.count {
            let end = min(start + Limits.discardUploadsMax, ids.count)
            do {
                try hub.discardUploads(context, ids: Array(ids[start..<end]))
            } catch let error as WeftError where error.errno == ENOSYS {
                hubDiscards.store(false, ordering: .relaxed)
                logger.info("the hub does not discard uploads; objects of failed commits go when the session ends")
                return
            } catch {
                logger.debug("could not discard \(end - start) upload(s) of a failed commit: \(error)")
                return
            }
            start = end
        }
    }

    /// Whether a commit that failed with `error` may still have been applied: the hub's answer
    /// was lost, not given (a timeout, a dropped connection). Objects of such a commit are not
    /// discarded, since the file may reference them.
    static func commitMayHaveApplied(_ error: Error) -> Bool {
        guard let error = error as? WeftError else { return true }
        switch error.errno {
        case ETIMEDOUT, EIO, ENOTCONN, ECONNRESET, ECONNREFUSED, ECONNABORTED, EPIPE, ESHUTDOWN, EHOSTUNREACH,
             ENETUNREACH, EINTR, EAGAIN:
            return true
        default:
            return false
        }
    }

    /// After a failed commit: whether the file no longer exists at the hub (unlinked and
    /// closed everywhere), so that its buffered writes can never be committed.
    func isGone(_ file: OpenFile, context: RequestContext) -> Bool {
        do {
            _ = try hub.getattr(context, ino: file.ino)
            return false
        } catch let error as WeftError where error.errno == ENOENT || error.errno == ESTALE {
            return true
        } catch {
            return false
        }
    }

    /// Drops every buffered write of `file`, discarding objects its staged chunks uploaded.
    /// No upload of the file may be running. Caller holds `file.lock`.
    func dropBuffers(_ file: OpenFile, context: RequestContext) {
        discard(file.staged.flatMap { $0.uploaded ?? [] }.map(\.slice.id), context: context)
        clearBuffers(file)
    }

    /// Returns the file's buffers to the pool and their bytes to the budget. Caller holds
    /// `file.lock`; no upload of the file runs.
    func clearBuffers(_ file: OpenFile) {
        budget.release(file.dirtyBytes)
        recycle(file)
        file.dirtyBytes = 0
        file.dirtyEnd = 0
        file.commitFailures = 0
        file.nextCommitAttemptNs = 0
    }

    /// Delay before the background commit tries a file again after `failures` failed commits in
    /// a row: 1 s, doubling, at most 30 s.
    static func commitRetryDelayMs(failures: Int) -> Int {
        guard failures > 0 else { return 0 }
        return min(1000 << min(failures - 1, 5), 30_000)
    }

    /// Records a failed commit of `file` for the background commit's back-off. Caller holds
    /// `file.lock`.
    func noteCommitFailure(_ file: OpenFile) {
        file.commitFailures += 1
        file.nextCommitAttemptNs = Leases.nowNs() + UInt64(Self.commitRetryDelayMs(failures: file.commitFailures)) * 1_000_000
    }
}
