#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftProto

/// Commits of buffered writes: their upload as chunk objects, the commit at the hub, and what a
/// failed commit leaves behind (SPEC.md §7 and §9.1): the objects an attempt wrote are
/// discarded when its commit was not applied, a file that no longer exists drops its buffers,
/// and background retries back off.
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

    // MARK: commit

    func nextSliceID(_ context: RequestContext) throws -> SliceID {
        lock.lock()
        if sliceIDs.next < sliceIDs.end {
            defer { sliceIDs.next += 1; lock.unlock() }
            return sliceIDs.next
        }
        lock.unlock()
        let first = try hub.allocateSliceIDs(context, count: sliceIDBatch)
        lock.lock()
        defer { lock.unlock() }
        sliceIDs = (first + 1, first + SliceID(sliceIDBatch))
        return first
    }

    /// Uploads the file's buffered extents as new chunk objects and commits them, after its
    /// staged chunks, in one change. Caller holds `file.lock`. On failure the buffers are kept,
    /// so nothing is lost, and the objects the attempt wrote are discarded unless its commit may
    /// have been applied; a file found gone (unlinked and closed everywhere) drops its buffers
    /// and throws ESTALE (SPEC.md §9.1).
    func flushLocked(_ file: OpenFile, context: RequestContext, durable: Bool) throws {
        guard file.hasDirtyData else {
            if durable { try syncHub(context, file: file.ino) }
            return
        }
        file.waitForUploads()
        guard file.hasDirtyData else {   // a background commit took everything meanwhile
            if durable { try syncHub(context, file: file.ino) }
            return
        }
        var attempt = 0
        var restarts = 0
        while true {
            attempt += 1
            var commits: [SliceCommit] = []
            // Objects of this attempt that nothing keeps if it fails: staged chunks keep theirs
            // for the next attempt, buffered extents are uploaded anew each time.
            var written: [SliceID] = []
            let epoch = uploadEpoch.load(ordering: .acquiring)
            do {
                for chunk in file.staged {
                    if let stale = chunk.uploaded, chunk.uploadEpoch != epoch {
                        // Uploaded before the hub reported uploads lost: written again. Not
                        // discarded while an earlier commit of the file may have applied (it
                        // may name them; the new upload is laid over them).
                        if !uncertainCommits.withLock({ $0.contains(file.ino) }) {
                            discard(stale.map(\.slice.id), context: context)
                        }
                        chunk.uploaded = nil
                    }
                    if chunk.uploaded == nil {
                        var chunkWritten: [SliceID] = []
                        do {
                            chunk.uploaded = try upload(chunk.extents, of: chunk.index, context: context,
                                                        written: &chunkWritten)
                            chunk.uploadEpoch = epoch
                        } catch {
                            written += chunkWritten
                            throw error
                        }
                    }
                    commits += chunk.uploaded!
                }
                for index in file.dirty.keys.sorted() {
                    commits += try upload(file.dirty[index]!, of: index, context: context, written: &written)
                }
            } catch {
                // Nothing was committed: what this attempt wrote is garbage.
                discard(written, context: context)
                try failed(file, error, context: context)
            }
            if uploadEpoch.load(ordering: .acquiring) != epoch && restarts < Self.epochRestartsMax {
                // The hub reported uploads lost while this attempt uploaded: its objects are in
                // doubt too (the staged ones are written again by the next attempt).
                discard(written, context: context)
                restarts += 1
                attempt -= 1   // not an attempt of its own
                continue
            }
            do {
                try commit(commits, of: file, minimumSize: file.dirtyEnd, durable: durable, context: context)
                clearBuffers(file)
                return
            } catch let error as WeftError where error.errno == ESTALE {
                // The hub lost objects (it restarted before the commit, or a sync pass failed on
                // them): every staged upload of the agent is in doubt, this file's are written
                // again now (once), other files' before their next commits.
                uploadEpoch.add(1, ordering: .releasing)
                guard attempt == 1, !isGone(file, context: context) else {
                    discard(written, context: context)
                    try failed(file, error, context: context)
                }
                logger.warning("re-uploading inode \(file.ino) data: \(error.message)")
                // Staged uploads an earlier commit that may have applied could name are left
                // (a data hub deletes whatever it is told to discard).
                let staged = uncertainCommits.withLock({ $0.contains(file.ino) })
                    ? [] : file.staged.flatMap { $0.uploaded ?? [] }.map(\.slice.id)
                discard(written + staged, context: context)
                for chunk in file.staged { chunk.uploaded = nil }
                continue
            } catch {
                if !Self.commitMayHaveApplied(error) { discard(written, context: context) }
                try failed(file, error, context: context)
            }
        }
    }

    /// Times one commit starts over because the upload epoch moved while it uploaded.
    static let epochRestartsMax = 3

    /// `hub.sync`, or with `file` `hub.syncFile` (an `fsync` of that file: the hub reports that
    /// file's failed chunk syncs, not the other files', SPEC.md §3.2). A data hub answers ESTALE
    /// once after a failed sync pass over objects this agent wrote there (SPEC.md §3.2): every
    /// staged upload is then written again before it is committed (`uploadEpoch`), and the
    /// caller gets EIO, as for any failed sync. A sync whose answer did not arrive (a timeout, a
    /// lost connection) may have been that report: the uploads are written again then too.
    func syncHub(_ context: RequestContext, file: InodeID? = nil) throws {
        do {
            if let file { try hub.syncFile(context, ino: file) } else { try hub.sync(context) }
        } catch let error as WeftError where error.errno == ESTALE {
            uploadEpoch.add(1, ordering: .releasing)
            throw WeftError(EIO, "\(error.message)")
        } catch where Self.commitMayHaveApplied(error) {
            uploadEpoch.add(1, ordering: .releasing)
            throw error
        }
    }

    /// After a failed upload or commit of `file`'s buffered writes: drops them if the file is
    /// gone (then throws ESTALE), else counts the failure for the background back-off and
    /// rethrows `error`. The hub is asked only when it answered the failed call: after a
    /// timeout or a lost connection the question would wait out the same timeout. Caller holds
    /// `file.lock`.
    private func failed(_ file: OpenFile, _ error: Error, context: RequestContext) throws -> Never {
        if !Self.commitMayHaveApplied(error) && isGone(file, context: context) {
            dropBuffers(file, context: context)
            throw WeftError(ESTALE, "inode \(file.ino) no longer exists; its buffered writes were dropped")
        }
        noteCommitFailure(file)
        throw error
    }

    /// Commits uploaded slices of `file` at the hub and adopts the attributes it returns.
    /// Caller holds `file.lock`.
    func commit(_ commits: [SliceCommit], of file: OpenFile, minimumSize: UInt64, durable: Bool,
                context: RequestContext) throws {
        if uncertainCommits.withLock({ $0.contains(file.ino) }) {
            // An earlier commit of the file may still apply: it must not land after this one.
            try hub.barrier(context, ino: file.ino)
            uncertainCommits.withLock { _ = $0.remove(file.ino) }
        }
        let before = file.attributes.dataVersion
        let attributes: Attributes
        do {
            attributes = try hub.commitSlices(context, ino: file.ino, slices: commits, minimumSize: minimumSize,
                                              durable: durable)
        } catch {
            if Self.commitMayHaveApplied(error) { uncertainCommits.withLock { _ = $0.insert(file.ino) } }
            throw error
        }
        adopt(attributes, of: file, committedOver: before)
    }

    /// Takes the attributes a commit of `file` returned, made over `before` (the data version the
    /// agent knew when it sent the commit). Caller holds `file.lock`.
    func adopt(_ attributes: Attributes, of file: OpenFile, committedOver before: UInt64) {
        if file.kernelCacheVersion == before { file.kernelCacheVersion = attributes.dataVersion }
        file.layouts.removeAll()
        file.attributes = attributes
    }

    /// Returns committed extents' buffers to the pool; their bytes.
    func giveBack(_ extents: [Extent]) -> Int {
        extents.reduce(0) { bytes, extent in
            let count = extent.buffer.count
            pool.give(extent.buffer)
            return bytes + count
        }
    }

    /// Drops a file's committed extents, staged ones included, returning pooled buffers. No
    /// upload of the file may be running.
    func recycle(_ file: OpenFile) {
        precondition(file.uploadsRunning == 0 && file.prefixCommit == nil, "recycling buffers an upload or a commit still uses")
        for extents in file.dirty.values { _ = giveBack(extents) }
        for chunk in file.staged { _ = giveBack(chunk.extents) }
        file.dirty.removeAll()
        file.staged.removeAll()
    }

    /// Frees write-buffer space by committing the file with the most buffered data.
    func flushSomeFile() throws {
        lock.lock()
        let victim = files.values.max { $0.dirtyBytes < $1.dirtyBytes }
        lock.unlock()
        guard let victim else { return }
        victim.lock.lock()
        defer { victim.lock.unlock() }
        do {
            try flushLocked(victim, context: context(.root), durable: false)
        } catch let error as WeftError where error.errno == ESTALE && !victim.hasDirtyData {
            // The victim no longer exists and its buffers were dropped: the space is free.
            logger.debug("dropped the buffered writes of inode \(victim.ino): \(error.message)")
        }
    }

    /// Commits every file's buffered writes.
    public func flushAll(durable: Bool) throws {
        lock.lock()
        let all = Array(files.values)
        lock.unlock()
        var failure: Error?
        for file in all {
            file.lock.lock()
            do { try flushLocked(file, context: context(.root), durable: false) } catch { failure = error }
            file.lock.unlock()
        }
        if durable { try syncHub(context(.root)) }
        if let failure { throw failure }
    }
}
