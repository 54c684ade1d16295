import Foundation
import Logging
import WeftProto

// MARK: Leases (SPEC.md §12.6)

extension VFS: LeaseClient {
    /// A recall from the home: commit the file's buffered writes if it was write-leased, drop
    /// its cached attributes and layouts, and invalidate the kernel's attributes, pages and the
    /// named entries. Never waits for a thread that holds the file's `lock` unless this agent
    /// held the write lease (whose holder's own commits never wait for recalls).
    public func recall(_ ino: InodeID, names: [[UInt8]], notice: Bool, deadlineNs: UInt64) -> Bool {
        let kernel = kernelIno(ino)
        leaseCache.recalled(kernel)
        Trace.note("recall ino=\(ino) notice=\(notice) names=\(names.map { String(decoding: $0, as: UTF8.self) })")
        let file = openFile(ino)
        if notice {
            file?.invalidate()
            return true
        }
        if let delay = Self.testRecallDelayUs { usleep(delay) }
        // Opens served locally become known to the home before the change (an unlink must keep
        // the file while it is open).
        if let file { registerLocalOpens(of: file) }
        if let file, file.revoke(committing: true) {
            defer { file.recallCommitEnded() }
            file.lock.lock()
            do {
                try flushLocked(file, context: context(.root), durable: false)
            } catch {
                logger.warning("recall of inode \(ino): commit of buffered writes failed, will retry: \(error)")
            }
            file.layouts.removeAll()
            file.lock.unlock()
        } else if let file {
            // An earlier recall may still be committing what was buffered under the write lease.
            file.waitForRecallCommits()
        }
        leaseCache.invalidateInode?(kernel)
        if !names.isEmpty { expireEntries(kernel, names) }
        Trace.note("recall ino=\(ino) answered")
        return true
    }

    /// How long a recall waits for the kernel to drop a directory's entries before it makes
    /// every entry of the mount stale instead.
    static let entryExpiryWaitMs = 10

    /// Makes the kernel look `names` of directory `kernel` up again before it answers a recall.
    ///
    /// The kernel takes the directory's lock for that, and holds it during this agent's own
    /// create, unlink or rename in the directory, whose call may be waiting at the home for
    /// another agent's answer to a recall, while that agent's kernel holds its directory's lock
    /// the same way: waiting for the lock made both wait until one call timed out. So the names
    /// are dropped on a thread of their own, and when that takes longer than
    /// `entryExpiryWaitMs`, every entry of the mount is made stale at once, which takes no
    /// lock; a lookup then asks again (and waits for the directory's lock, as it must). A kernel
    /// before Linux 6.16 cannot; there the recall waits for the lock (SPEC.md §12.6).
    func expireEntries(_ kernel: UInt64, _ names: [[UInt8]]) {
        guard let invalidateEntry = leaseCache.invalidateEntry else { return }
        let done = DispatchSemaphore(value: 0)
        let cache = leaseCache
        cache.dropsBegan(kernel, names)
        WorkerPool.detach {
            for name in names { invalidateEntry(kernel, name) }
            cache.dropsEnded(kernel, names)
            done.signal()
            // The kernel may still be installing an entry from a reply that left before the
            // recall arrived: drop the names once more shortly after.
            usleep(20_000)
            for name in names { invalidateEntry(kernel, name) }
        }
        guard done.wait(timeout: .now() + .milliseconds(Self.entryExpiryWaitMs)) == .timedOut else { return }
        if leaseCache.expireAllEntries?() == true {
            leaseCache.expiredWhole()
            logger.debug("recall of directory \(kernel): its lock is held, every kernel entry made stale")
        } else {
            done.wait()
        }
    }

    public var lastHeardNs: UInt64 { Leases.nowNs() }

    /// Registers at the home the opens of `file` served locally under its lease.
    func registerLocalOpens(of file: OpenFile) {
        let local: [FileHandle] = file.leaseLock.withLock {
            let handles = file.localHandles
            file.localHandles.removeAll()
            for handle in handles { handle.registered = true }
            return handles
        }
        for handle in local {
            do {
                _ = try hub.open(handle.context, ino: file.ino, flags: handle.flags)
            } catch {
                logger.warning("inode \(file.ino): could not register a local open at the home: \(error)")
            }
        }
    }

    /// After this agent's own unlink or rename: the attributes it keeps of its files may be stale
    /// (its own changes recall nothing of its own), so they are fetched again when next used.
    /// O(1): it bumps the count every file's freshness includes.
    func invalidateFiles() {
        ownChanges.bump()
    }

    /// Before this agent's own unlink or rename (which may remove a file it has open, and which
    /// recalls nothing of its own): registers every local open at the home. Scans only the files
    /// with local opens, not every file kept.
    func registerLocalOpens() {
        lock.lock()
        var withLocal: [OpenFile] = []
        var gone: [InodeID] = []
        for ino in filesWithLocalOpens {
            if let file = files[ino], file.leaseLock.withLock({ !file.localHandles.isEmpty }) {
                withLocal.append(file)
            } else {
                gone.append(ino)
            }
        }
        for ino in gone { filesWithLocalOpens.remove(ino) }
        lock.unlock()
        for file in withLocal { registerLocalOpens(of: file) }
    }

    /// Every lease of this volume is void: drop what the leases covered. Cached attributes and
    /// entries in the kernel expire by their own 1 s timeouts; pages of open files are dropped
    /// (in the background: this runs on the connection's thread and must not block). Write
    /// leases are marked for reclaim on the next connection.
    public func leasesLost() {
        leaseCache.lost()
        lock.lock()
        let open = Array(files.values)
        lock.unlock()
        for file in open where file.revoke() {
            file.leaseLock.withLock { file.reclaim = true }
        }
        guard !open.isEmpty else { return }
        logger.warning("leases lost (hub silent or reconnected): dropping the caches of \(open.count) open file(s)")
        let kernel = open.map { kernelIno($0.ino) }
        let cache = leaseCache
        DispatchQueue.global().async {
            for ino in kernel { cache.invalidateInode?(ino) }
        }
    }

    public func reclaimableWriteLeases() -> [InodeID] {
        lock.lock()
        let open = Array(files.values)
        lock.unlock()
        return open.filter { file in file.leaseLock.withLock { file.reclaim } }.map(\.ino)
    }

    public func writeLeaseReclaimed(_ ino: InodeID, granted: Bool) {
        guard let file = openFile(ino) else { return }
        file.leaseLock.withLock {
            file.reclaim = false
            if granted { file.writeLeased = true }
        }
        logger.info("write lease on inode \(ino) \(granted ? "reclaimed" : "not reclaimed: buffered writes go through")")
    }

    /// The agent lives in the hub's process when it reaches a `Hub` directly.
    public var survivesHubRestart: Bool { false }

    /// A token to take before a call whose reply the kernel may cache (`mayCache`).
    public func cacheToken() -> UInt64 { leaseCache.token() }

    /// Whether the kernel may cache a reply about kernel inode `ino` to a call begun at `token`.
    public func mayCache(_ ino: InodeID, since token: UInt64) -> Bool {
        !leasesEnabled || leaseCache.mayCache(ino, since: token)
    }
}
