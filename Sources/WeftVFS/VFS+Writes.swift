import Foundation
import Logging
import WeftProto

/// Writes through handles: buffering, write-behind uploads of whole chunks, and the commits at
/// `flush`, `fsync` and `release` (SPEC.md §7).
extension VFS {
    func fileHandle(_ id: UInt64) throws -> FileHandle {
        lock.lock()
        defer { lock.unlock() }
        guard let handle = fileHandles[id] else { throw WeftError(EBADF) }
        return handle
    }

    public func write(handle id: UInt64, offset: UInt64, data: UnsafeRawBufferPointer) throws -> Int {
        var from = 0
        return try write(handle: id, offset: offset, count: data.count) { destination in
            destination.copyMemory(from: UnsafeRawBufferPointer(rebasing: data[from..<from + destination.count]))
            from += destination.count
        }
    }

    /// Writes `count` bytes at `offset`, which `fill` copies, in order and piece by piece, into
    /// the write buffer's memory: the FUSE adapter reads a write's data there straight from the
    /// pipe the kernel spliced it into (SPEC.md §8, Writes). If `fill` fails after some pieces,
    /// the write is short (those bytes stay written); if it fails at once, the write fails.
    public func write(handle id: UInt64, offset: UInt64, count: Int,
                      fill: (UnsafeMutableRawBufferPointer) throws -> Void) throws -> Int {
        let handle = try fileHandle(id)
        let accessMode = handle.flags & O_ACCMODE
        guard accessMode == O_WRONLY || accessMode == O_RDWR else { throw WeftError(EBADF) }
        if count == 0 { return 0 }
        try budget.reserve(count) { try self.flushSomeFile() }
        let file = handle.file
        file.lock.lock()
        defer { file.lock.unlock() }
        let position = handle.flags & O_APPEND != 0 ? file.visibleAttributes.size : offset
        guard position + UInt64(count) <= Limits.fileSizeMaxBytes else {
            budget.release(count)
            throw WeftError.fileTooBig
        }
        /// Buffers the bytes; returns how many, releasing the budget of the rest.
        func buffer() throws -> Int {
            let (buffered, error) = file.buffer(count: count, at: position, chunkSizeBytes: chunkSizeBytes,
                                                pool: pool, fill: fill)
            if buffered < count { budget.release(count - buffered) }
            if let error {
                logger.error("write to inode \(file.ino): its data could not be read (\(error)); \(buffered) of \(count) bytes written")
                if buffered == 0 { throw error }
            }
            return buffered
        }
        // Without the write lease another node may read this file now: write through. Earlier
        // buffered writes commit first; if this write's commit then fails, its bytes are
        // dropped, so that a write() that failed has no effect later (SPEC.md §7).
        if !file.isWriteLeased {
            if file.hasDirtyData {
                do { try flushLocked(file, context: handle.context, durable: false) } catch {
                    budget.release(count)
                    throw error
                }
            }
            let written = try buffer()
            do { try flushLocked(file, context: handle.context, durable: false) } catch {
                if file.hasDirtyData { clearBuffers(file) }
                throw error
            }
            return written
        }
        let written = try buffer()
        logger.trace("write \(file.ino) at \(position) +\(written): dirty end \(file.dirtyEnd)")
        let chunkSize = UInt64(chunkSizeBytes)
        for index in UInt32(position / chunkSize)...UInt32((position + UInt64(written) - 1) / chunkSize) {
            if let chunk = file.stageIfFull(index, chunkSizeBytes: chunkSizeBytes) {
                startUpload(chunk, of: file, context: handle.context)
            }
        }
        commitUploadedPrefix(file, context: handle.context)
        return written
    }

    /// Uploaded staged chunks at the front of a file's list that make a commit of their own.
    static let stagedCommitBatch = 4

    /// Commits the staged chunks at the front of `file`'s list whose uploads ended, once there
    /// are `stagedCommitBatch` of them: a long write publishes its progress and frees their
    /// buffers without waiting for the file's next commit. Everything staged or buffered after
    /// them is newer, so committing them first keeps the slice order. The commit runs in the
    /// background (the writer goes on; SPEC.md §7, Write-behind), one at a time per file, and
    /// not while another commit of the file waits (it commits them itself). A failure is left
    /// to the next commit. Caller holds `file.lock`.
    func commitUploadedPrefix(_ file: OpenFile, context: RequestContext) {
        guard file.prefixCommit == nil, file.commitsWaiting == 0, Leases.nowNs() >= file.nextCommitAttemptNs else { return }
        let epoch = uploadEpoch.load(ordering: .acquiring)
        let ready = Array(file.staged.prefix { $0.uploaded != nil && $0.uploadEpoch == epoch })
        guard ready.count >= Self.stagedCommitBatch else { return }
        let commits = ready.flatMap { $0.uploaded! }
        let chunkSize = UInt64(chunkSizeBytes)
        let end = commits.map { UInt64($0.chunkIndex) * chunkSize + UInt64($0.slice.offsetInChunk) + UInt64($0.slice.length) }
            .max() ?? 0
        let before = file.attributes.dataVersion
        file.prefixCommitToken &+= 1
        let token = file.prefixCommitToken
        file.prefixCommit = ready
        file.prefixCommitStarted = false
        Self.commitPool.async { [self] in
            // A commit of the file that waited before this task began (the pool may be busy
            // with other files' commits) took the chunks back and commits them itself.
            let (stillWanted, uncertain): (Bool, Bool) = file.lock.withLock {
                guard file.prefixCommitToken == token, file.prefixCommit != nil else { return (false, false) }
                guard file.commitsWaiting == 0 else {
                    file.prefixCommit = nil
                    file.lock.broadcast()
                    return (false, false)
                }
                file.prefixCommitStarted = true
                return (true, uncertainCommits.withLock { $0.contains(file.ino) })
            }
            guard stillWanted else { return }
            var outcome: Result<Attributes, Error>
            var barrierPassed = false
            do {
                // As `commit`: an earlier commit of the file that may still apply goes first.
                // (Every other commit of the file waits for this one, so none runs meanwhile.)
                if uncertain {
                    try hub.barrier(context, ino: file.ino)
                    barrierPassed = true
                }
                outcome = .success(try hub.commitSlices(context, ino: file.ino, slices: commits, minimumSize: end,
                                                        durable: false))
            } catch {
                outcome = .failure(error)
            }
            file.lock.lock()
            defer { file.lock.unlock() }
            file.prefixCommit = nil
            file.prefixCommitStarted = false
            if case .failure(let error) = outcome, Self.commitMayHaveApplied(error) {
                uncertainCommits.withLock { _ = $0.insert(file.ino) }
            } else if barrierPassed {
                uncertainCommits.withLock { _ = $0.remove(file.ino) }
            }
            file.lock.broadcast()
            switch outcome {
            case .success(let attributes):
                // Nothing else takes staged chunks while this commit runs (every other commit
                // waits for it first), so they are still at the front.
                precondition(file.staged.count >= ready.count && zip(file.staged, ready).allSatisfy { $0 === $1 },
                             "staged chunks changed under their commit")
                // Its reply may be older than attributes adopted meanwhile (the commit ran
                // without the lock): never go back.
                if attributes.dataVersion >= file.attributes.dataVersion {
                    adopt(attributes, of: file, committedOver: before)
                } else {
                    file.layouts.removeAll()
                }
                file.commitFailures = 0
                file.nextCommitAttemptNs = 0
                let bytes = ready.reduce(0) { $0 + giveBack($1.extents) }
                file.staged.removeFirst(ready.count)
                file.dirtyBytes -= bytes
                budget.release(bytes)
                if !file.hasDirtyData { file.dirtyEnd = 0 }
                commitUploadedPrefix(file, context: context)
            case .failure(let error):
                // The objects are gone (the hub restarted): the next commit uploads them again.
                if (error as? WeftError)?.errno == ESTALE {
                    uploadEpoch.add(1, ordering: .releasing)
                    if !uncertainCommits.withLock({ $0.contains(file.ino) }) {
                        discard(ready.flatMap { $0.uploaded ?? [] }.map(\.slice.id), context: context)
                    }
                    ready.forEach { $0.uploaded = nil }
                }
                // Not again before the back-off (flush, fsync and close try at once).
                noteCommitFailure(file)
                logger.debug("commit of inode \(file.ino)'s uploaded chunks failed, the next commit retries: \(error)")
            }
        }
    }

    /// Uploads a staged chunk in the background (SPEC.md §7, Write-behind); the file's next
    /// commit waits for it and commits its slices, or uploads it again if it failed.
    func startUpload(_ chunk: StagedChunk, of file: OpenFile, context: RequestContext) {
        Self.uploadPool.async { [self] in
            let epoch = uploadEpoch.load(ordering: .acquiring)
            var slices: [SliceCommit]?
            var written: [SliceID] = []
            do {
                slices = try upload(chunk.extents, of: chunk.index, context: context, written: &written)
            } catch {
                discard(written, context: context)
                logger.debug("background upload of inode \(file.ino) chunk \(chunk.index) failed, the commit retries: \(error)")
            }
            file.lock.lock()
            file.uploadEnded(chunk, slices: slices, epoch: epoch)
            commitUploadedPrefix(file, context: context)
            file.lock.unlock()
        }
    }

    /// Background uploads of full chunks, shared by every VFS of the process.
    static let uploadPool = WorkerPool(name: "weft-upload", threads: 4)

    /// Background commits of uploaded chunks (`commitUploadedPrefix`), apart from the uploads so
    /// that commits waiting for the hub never hold up the uploads behind them.
    static let commitPool = WorkerPool(name: "weft-commit", threads: commitPoolThreads)
    static let commitPoolThreads = 4

    /// Commits the handle's file (close(2) and flush).
    public func flush(handle id: UInt64) throws {
        let handle = try fileHandle(id)
        handle.file.lock.lock()
        defer { handle.file.lock.unlock() }
        try flushLocked(handle.file, context: handle.context, durable: false)
    }

    /// Commits the file and makes it durable on the hub.
    public func fsync(handle id: UInt64) throws {
        let handle = try fileHandle(id)
        handle.file.lock.lock()
        defer { handle.file.lock.unlock() }
        try flushLocked(handle.file, context: handle.context, durable: true)
    }

    public func release(handle id: UInt64) throws {
        lock.lock()
        let handle = fileHandles.removeValue(forKey: id)
        lock.unlock()
        guard let handle else { throw WeftError(EBADF) }
        let file = handle.file
        logger.trace("release handle \(id) of \(file.ino)")
        file.lock.lock()
        var failure: Error?
        do { try flushLocked(file, context: handle.context, durable: false) } catch { failure = error }
        file.lock.unlock()
        let registered: Bool = file.leaseLock.withLock {
            if !handle.registered { file.localHandles.removeAll { $0 === handle } }
            return handle.registered
        }
        lock.lock()
        if !registered && file.leaseLock.withLock({ file.localHandles.isEmpty }) {
            filesWithLocalOpens.remove(file.ino)
        }
        file.handles -= 1
        var layoutsToDrop: OpenFile?
        if file.handles == 0 && !file.hasDirtyData {
            if leasesEnabled && file.isFresh {
                // Keep what the lease covers for the next open; forget the least recently closed
                // beyond the bound, and the layouts of all but about the newest `keptLayoutsMax`.
                keptFiles.keep(file)
                for old in keptFiles.evict(beyond: options.keptFilesMax)
                where old.handles == 0 && !old.hasDirtyData && files[old.ino] === old {
                    files[old.ino] = nil
                }
                if let old = keptFiles.kept(before: options.keptLayoutsMax), old.handles == 0 {
                    layoutsToDrop = old
                }
            } else {
                keptFiles.forget(file)
                files[file.ino] = nil
            }
        }
        lock.unlock()
        if let layoutsToDrop {
            // Outside the VFS lock (a file's lock is never taken under it); a reopen fetches them.
            layoutsToDrop.lock.withLock { layoutsToDrop.layouts.removeAll() }
        }
        if registered { closes.add(file.ino, vfs: self) }
        if let failure { throw failure }
    }

    /// Sends queued closes to the home (`releaseMany`), until none is left.
    func sendCloses() {
        while let batch = closes.next() {
            do {
                try hub.releaseMany(context(.root), inos: batch)
            } catch {
                // The home ends the session's opens when the session ends; nothing else to do.
                logger.debug("could not tell the home of \(batch.count) close(s): \(error)")
            }
        }
    }
}

/// Closes of registered opens waiting to be sent to the home (SPEC.md §7, Closes). The kernel
/// does not wait for a release, so neither does the agent: a close is queued, and one sender
/// per volume, started `lingerMs` after the first close that finds it idle, sends everything
/// queued by then in one `releaseMany`, and goes on while more were queued meanwhile.
final class PendingCloses: @unchecked Sendable {
    private let lock = NSCondition()
    private var queued: [InodeID] = []
    private var sending = false
    private let queue = DispatchQueue(label: "weft-vfs-closes")
    /// How long the first close waits for others to share its call. A file unlinked while open
    /// is reclaimed this much later; nothing else waits for a close.
    static let lingerMs = 10
    /// Closes taken for sending, and the calls that carried them (tests).
    private(set) var taken = (closes: 0, calls: 0)

    /// Queues one close of `ino`; starts the sender if it is idle.
    func add(_ ino: InodeID, vfs: VFS) {
        lock.lock()
        queued.append(ino)
        let start = !sending
        sending = true
        lock.unlock()
        if start { queue.asyncAfter(deadline: .now() + .milliseconds(Self.lingerMs)) { vfs.sendCloses() } }
    }

    /// The next batch to send (at most `Limits.releaseManyMax`), or nil (the sender stops).
    func next() -> [InodeID]? {
        lock.lock()
        defer { lock.unlock() }
        guard !queued.isEmpty else {
            sending = false
            lock.broadcast()
            return nil
        }
        let count = min(queued.count, Limits.releaseManyMax)
        let batch = Array(queued.prefix(count))
        queued.removeFirst(count)
        taken.closes += count
        taken.calls += 1
        return batch
    }

    /// Waits until every queued close was sent (or failed); returns `taken` then.
    @discardableResult
    func drain() -> (closes: Int, calls: Int) {
        lock.lock()
        defer { lock.unlock() }
        while sending { lock.wait() }
        return taken
    }
}
