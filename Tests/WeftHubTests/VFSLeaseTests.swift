#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftTestSupport
import XCTest
import WeftHub
import WeftProto
@testable import WeftVFS

/// Coherence between agents through leases (SPEC.md §12.6), in process and over TCP (the
/// `VFSDataTests` fixture runs on both transports).
extension VFSDataTests {
    func testAReturnedWriteIsReadByAnotherAgentBeforeTheWriterCloses() throws {
        let writer = try makeAgent(), reader = try makeAgent()
        let (ino, handle) = try create(writer, "unclosed")
        try write(writer, handle, at: 0, Array("hello".utf8))
        // The writer holds the write lease and buffers; the reader's getattr and read recall it.
        XCTAssertEqual(try reader.getattr(rootCaller, ino: ino).size, 5)
        XCTAssertEqual(try contents(of: ino, via: reader), Array("hello".utf8))
        // Now the writer writes through (it lost the lease): each write is visible at once.
        try write(writer, handle, at: 5, Array(" world".utf8))
        XCTAssertEqual(try contents(of: ino, via: reader), Array("hello world".utf8))
        try writer.release(handle: handle)
    }

    /// The home may recall one write lease several times at once (once per change that needs
    /// it). Only the first recall commits the buffered writes; every other must not be answered
    /// before that commit is at the home, or the home would read the file without them.
    func testASecondRecallIsNotAnsweredBeforeTheFirstHasCommittedTheBufferedWrites() throws {
        let writer = try makeAgent(writeBufferBytes: 64 << 20)
        let (ino, handle) = try create(writer, "recalled twice")
        var random = SeededRandom(seed: 7)
        let data = random.bytes(256 * Self.chunk)   // 16 MiB: its commit takes a while
        try write(writer, handle, at: 0, data)
        let file = try XCTUnwrap(writer.openFile(ino))
        XCTAssertTrue(file.isWriteLeased, "buffered under the write lease")
        XCTAssertEqual(try fixture.hub.meta.getattr(ino).size, 0, "nothing committed yet")
        let first = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            _ = writer.recall(ino, names: [], notice: false, deadlineNs: UInt64.max)
            first.signal()
        }
        while file.isWriteLeased { sched_yield() }   // the first recall has begun its commit
        _ = writer.recall(ino, names: [], notice: false, deadlineNs: UInt64.max)
        XCTAssertEqual(try fixture.hub.meta.getattr(ino).size, UInt64(data.count),
                       "the second answer came after the buffered writes reached the home")
        first.wait()
        try writer.release(handle: handle)
    }

    func testAnOpenHandleDoesNotReadStaleBytesAfterAnotherAgentsCommit() throws {
        let first = try makeAgent(), second = try makeAgent()
        let (ino, handle) = try create(first, "shared")
        var random = SeededRandom(seed: 41)
        let data = random.bytes(3 * Self.chunk)
        try write(first, handle, at: 0, data)
        try first.release(handle: handle)
        let (readHandle, _) = try first.open(rootCaller, ino: ino, flags: O_RDONLY)
        XCTAssertEqual(try read(first, readHandle, at: 0, data.count), data)   // layouts now cached
        let (writeHandle, _) = try second.open(rootCaller, ino: ino, flags: O_RDWR)
        try write(second, writeHandle, at: Self.chunk + 10, [9, 9, 9])
        try second.flush(handle: writeHandle)
        var expected = data
        expected.replaceSubrange(Self.chunk + 10..<Self.chunk + 13, with: [9, 9, 9])
        XCTAssertEqual(try read(first, readHandle, at: 0, data.count), expected, "the recall dropped the cached layout")
        try second.release(handle: writeHandle)
        try first.release(handle: readHandle)
    }

    /// A read whose layout a notice overtook (a change of the file was under way at the home)
    /// fetches it again until no change overtakes it, so that the pages it fills are covered by a
    /// lease; while the change lasts past `overtakenFetchesMax` fetches, the read is answered
    /// from the last fetch, uncached.
    func testALayoutFetchOvertakenByANoticeIsFetchedAgainUntilALeaseCoversIt() throws {
        let writer = try makeAgent(), reader = try makeAgent()
        let (ino, handle) = try create(writer, "overtaken")
        try write(writer, handle, at: 0, Array("before".utf8))
        try writer.release(handle: handle)
        let (readHandle, _) = try reader.open(rootCaller, ino: ino, flags: O_RDONLY)
        defer { try? reader.release(handle: readHandle) }
        let readerFile = try XCTUnwrap(reader.openFile(ino))
        let change = [LeaseTable.Target(ino, isFile: true)]
        let ghost: SessionID = 0xFFFF_0001   // a change by nobody the table knows: recalls everyone

        // A change under way for 30 ms: the read waits it out and ends with a lease.
        _ = fixture.hub.leases.beginChange(ghost, change)
        let ended = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            usleep(30_000)
            self.fixture.hub.leases.endChange(change)
            ended.signal()
        }
        let started = DispatchTime.now().uptimeNanoseconds
        XCTAssertEqual(try read(reader, readHandle, at: 0, 6), Array("before".utf8))
        let waitedMs = (DispatchTime.now().uptimeNanoseconds - started) / 1_000_000
        ended.wait()
        XCTAssertGreaterThan(reader.overtakenFetches.load(ordering: .relaxed), 0, "the notice was answered by a fetch again")
        XCTAssertGreaterThanOrEqual(waitedMs, 20, "the read waited for the change to end")
        XCTAssertTrue(readerFile.isFresh, "the last fetch came after the change: a lease covers it")

        // A change that outlasts every fetch: the read is answered anyway, and nothing is kept.
        let before = reader.overtakenFetches.load(ordering: .relaxed)
        _ = fixture.hub.leases.beginChange(ghost, change)
        XCTAssertEqual(try read(reader, readHandle, at: 0, 6), Array("before".utf8))
        fixture.hub.leases.endChange(change)
        // (Read-ahead may have fetched too.)
        XCTAssertGreaterThanOrEqual(reader.overtakenFetches.load(ordering: .relaxed) - before,
                                    UInt64(VFS.overtakenFetchesMax - 1))
        XCTAssertFalse(readerFile.isFresh, "no lease covers a reply that a change overtook")
    }

    func testAFileOpenedUnderALeaseStaysReadableWhenAnotherAgentUnlinksIt() throws {
        let holder = try makeAgent(), remover = try makeAgent()
        let (ino, handle) = try create(holder, "doomed")
        try write(holder, handle, at: 0, Array("still here".utf8))
        try holder.release(handle: handle)
        XCTAssertEqual(try contents(of: ino, via: holder), Array("still here".utf8))
        let inodesBefore = fixture.hub.meta.currentCounters.inodes
        // Under the lease this open makes no call to the home...
        let (local, _) = try holder.open(rootCaller, ino: ino, flags: O_RDONLY)
        XCTAssertTrue(holder.openFile(ino)?.leaseLock.withLock { !holder.openFile(ino)!.localHandles.isEmpty } ?? false,
                      "a read-only open under a lease stays local")
        // ...so the unlink's recall registers it there first, and the file outlives its name.
        try remover.unlink(rootCaller, parent: root, name: Array("doomed".utf8))
        XCTAssertEqual(try read(holder, local, at: 0, 100), Array("still here".utf8))
        XCTAssertEqual(fixture.hub.meta.currentCounters.inodes, inodesBefore, "kept while open")
        try holder.release(handle: local)
        XCTAssertTrue(eventually { self.fixture.hub.meta.currentCounters.inodes == inodesBefore - 1 },
                      "reclaimed at the last close")
    }

    func testTwoWritersWriteThroughAndSeeEachOther() throws {
        let a = try makeAgent(), b = try makeAgent()
        let (ino, created) = try create(a, "contended")
        try a.release(handle: created)
        let (ha, _) = try a.open(rootCaller, ino: ino, flags: O_RDWR)
        let (hb, _) = try b.open(rootCaller, ino: ino, flags: O_RDWR)
        for round in 0..<8 {
            let (writer, handle, other, otherHandle) = round % 2 == 0 ? (a, ha, b, hb) : (b, hb, a, ha)
            try write(writer, handle, at: round, [UInt8(round + 1)])
            XCTAssertEqual(try read(other, otherHandle, at: round, 1), [UInt8(round + 1)], "round \(round)")
        }
        try a.release(handle: ha)
        try b.release(handle: hb)
        XCTAssertEqual(try contents(of: ino, via: a), (1...8).map(UInt8.init))
    }

    /// Written through (another agent has the file open for writing): a write whose data
    /// stops after its first piece commits that piece and is short; the other agent sees it.
    func testAShortWriteThroughCommitsWhatItBuffered() throws {
        let a = try makeAgent(), b = try makeAgent()
        let (ino, created) = try create(a, "through")
        try a.release(handle: created)
        let (ha, _) = try a.open(rootCaller, ino: ino, flags: O_RDWR)
        let (hb, _) = try b.open(rootCaller, ino: ino, flags: O_RDWR)
        XCTAssertFalse(a.openFile(ino)!.lock.withLock { a.openFile(ino)!.isWriteLeased }, "written through")
        var random = SeededRandom(seed: 91)
        let data = random.bytes(Self.chunk + 500)
        var from = 0
        let written = try a.write(handle: ha, offset: 0, count: data.count) { piece in
            if from > 0 { throw WeftError(EIO, "pipe") }
            piece.copyBytes(from: data[0..<piece.count])
            from += piece.count
        }
        XCTAssertEqual(written, Self.chunk)
        XCTAssertEqual(a.budget.used, 0, "committed before the write returned")
        XCTAssertEqual(try read(b, hb, at: 0, data.count), Array(data[0..<Self.chunk]))
        try a.release(handle: ha)
        try b.release(handle: hb)
    }

    func testDirectoryAttributesAreKeptUnderTheLeaseAndFollowEveryChange() throws {
        let a = try makeAgent(), b = try makeAgent()
        let dir = try a.mkdir(rootCaller, parent: root, name: bytes("d"), mode: 0o755, umask: 0).ino
        func kept() -> Bool {
            guard let entry = a.lock.withLock({ a.directories[dir] }) else { return false }
            return a.leaseCache.mayCache(a.kernelIno(dir), since: entry.token)
        }
        var seen = try a.getattr(rootCaller, ino: dir)
        XCTAssertTrue(kept(), "a directory's attributes are kept under its lease")
        XCTAssertEqual(try a.getattr(rootCaller, ino: dir), seen)

        // Another agent's changes recall the directory before they commit.
        _ = try b.mkdir(rootCaller, parent: dir, name: bytes("sub"), mode: 0o755, umask: 0)
        XCTAssertFalse(kept(), "recalled by another agent's mkdir")
        var now = try a.getattr(rootCaller, ino: dir)
        XCTAssertEqual(now.nlink, seen.nlink + 1)
        XCTAssertGreaterThan(now.mtimeNs, seen.mtimeNs)
        seen = now
        _ = try b.setattr(rootCaller, ino: dir, SetAttributes(mode: 0o700))
        XCTAssertEqual(try a.getattr(rootCaller, ino: dir).mode & 0o7777, 0o700)

        // This agent's own changes recall nothing of its own: it forgets what it kept.
        seen = try a.getattr(rootCaller, ino: dir)
        XCTAssertTrue(kept())
        _ = try a.mkdir(rootCaller, parent: dir, name: bytes("own"), mode: 0o755, umask: 0)
        now = try a.getattr(rootCaller, ino: dir)
        XCTAssertEqual(now.nlink, seen.nlink + 1, "own mkdir")
        let (created, handle) = try a.create(rootCaller, parent: dir, name: bytes("f"), mode: regularFile | 0o644,
                                          umask: 0, flags: O_RDWR)
        try a.release(handle: handle)
        XCTAssertGreaterThan(try a.getattr(rootCaller, ino: dir).mtimeNs, now.mtimeNs, "own create")
        _ = try a.getattr(rootCaller, ino: dir)
        try a.rename(rootCaller, parent: dir, name: bytes("own"), newParent: root, newName: bytes("moved"), flags: [])
        XCTAssertEqual(try a.getattr(rootCaller, ino: dir).nlink, seen.nlink, "own rename of a subdirectory out")
        _ = try a.getattr(rootCaller, ino: dir)
        try a.rmdir(rootCaller, parent: dir, name: bytes("sub"))
        XCTAssertEqual(try a.getattr(rootCaller, ino: dir).nlink, seen.nlink - 1, "own rmdir")
        now = try a.getattr(rootCaller, ino: dir)
        try a.setxattr(rootCaller, ino: dir, name: bytes("user.k"), value: [1], flags: [])
        XCTAssertGreaterThan(try a.getattr(rootCaller, ino: dir).ctimeNs, now.ctimeNs, "own setxattr")
        _ = try a.setattr(rootCaller, ino: dir, SetAttributes(mode: 0o750))
        XCTAssertEqual(try a.getattr(rootCaller, ino: dir).mode & 0o7777, 0o750, "own chmod")
        try a.unlink(rootCaller, parent: dir, name: bytes("f"))
        XCTAssertEqual(try a.getattr(rootCaller, ino: dir), try b.getattr(rootCaller, ino: dir), "own unlink")
        a.closes.drain()   // the file goes when the home has its close (SPEC.md §7, Closes)
        XCTAssertThrowsError(try b.getattr(rootCaller, ino: created.ino))
    }

    func testACreatedFileIsKnownByNameAndAnOwnUnlinkStalesOnlyItsFile() throws {
        let a = try makeAgent(), b = try makeAgent()
        func known(_ name: String) -> InodeID? {
            guard let entry = a.lock.withLock({ a.names[NameKey(parent: root, name: bytes(name))] }),
                  a.leaseCache.mayCache(a.kernelIno(root), since: entry.token) else { return nil }
            return entry.ino
        }
        let (x, hx) = try create(a, "x")
        let (y, hy) = try create(a, "y")
        try a.release(handle: hx)
        try a.release(handle: hy)
        // The create's reply named the file and carried the directory's new attributes.
        XCTAssertEqual(known("x"), x)
        XCTAssertEqual(known("y"), y)
        XCTAssertEqual(try a.lookup(rootCaller, parent: root, name: bytes("x")).ino, x)
        XCTAssertEqual(a.lock.withLock { a.directories[root]?.attributes }, try b.getattr(rootCaller, ino: root),
                       "the directory as the home has it after both creates")
        XCTAssertEqual(a.openFile(y)?.isFresh, true)

        // Unlinking a name known under the lease marks only that file's attributes stale.
        try a.unlink(rootCaller, parent: root, name: bytes("x"))
        XCTAssertNil(known("x"))
        XCTAssertErrno(ENOENT, try a.lookup(rootCaller, parent: root, name: bytes("x")))
        XCTAssertEqual(a.openFile(y)?.isFresh, true, "y's attributes did not change and stay cached")
        XCTAssertNotEqual(a.openFile(x)?.isFresh, true)

        // A second link of y, unlinked by name: y's link count is fetched again.
        _ = try a.link(rootCaller, ino: y, newParent: root, newName: bytes("y2"))
        XCTAssertEqual(try a.getattr(rootCaller, ino: y).nlink, 2)
        XCTAssertEqual(try a.lookup(rootCaller, parent: root, name: bytes("y2")).ino, y)
        try a.unlink(rootCaller, parent: root, name: bytes("y2"))
        XCTAssertEqual(try a.getattr(rootCaller, ino: y).nlink, 1)

        // A name this agent never learned: which file changed is unknown, so every kept file is stale.
        let (w, hw) = try create(a, "w")
        try a.release(handle: hw)
        let (z, hz) = try create(b, "z")
        try b.release(handle: hz)
        XCTAssertEqual(a.openFile(w)?.isFresh, true)
        XCTAssertNil(known("z"))
        try a.unlink(rootCaller, parent: root, name: bytes("z"))
        XCTAssertNotEqual(a.openFile(w)?.isFresh, true)
        b.closes.drain()   // z goes when the home has b's close
        XCTAssertErrno(ENOENT, try b.getattr(rootCaller, ino: z))
        XCTAssertEqual(try a.getattr(rootCaller, ino: w).nlink, 1)
    }

    func testClosedFilesAreKeptUpToTheBoundAndOnlyTheNewestKeepTheirLayouts() throws {
        let a = try makeAgent(keptFiles: (files: 6, layouts: 2)), b = try makeAgent()
        func payload(_ index: Int) -> [UInt8] { Array(repeating: UInt8(index + 1), count: 1000 + index) }
        var inodes: [InodeID] = []
        for index in 0..<8 {
            let (ino, handle) = try create(a, "kept\(index)")
            try write(a, handle, at: 0, payload(index))
            XCTAssertEqual(try read(a, handle, at: 0, 4096), payload(index))  // commits, then fetches layouts
            try a.release(handle: handle)
            inodes.append(ino)
        }
        // The two oldest are forgotten; the other six stay, covered by their leases.
        XCTAssertNil(a.openFile(inodes[0]))
        XCTAssertNil(a.openFile(inodes[1]))
        for ino in inodes[2...] { XCTAssertEqual(a.openFile(ino)?.isFresh, true, "inode \(ino)") }
        // Only the two newest keep their layouts.
        let withLayouts = inodes.filter { ino in
            guard let file = a.openFile(ino) else { return false }
            return file.lock.withLock { !file.layouts.isEmpty }
        }
        XCTAssertEqual(withLayouts, Array(inodes[6...]))
        // A kept file's attributes answer getattr and lookup as the home has them.
        XCTAssertEqual(try a.getattr(rootCaller, ino: inodes[3]), try b.getattr(rootCaller, ino: inodes[3]))
        XCTAssertEqual(try a.lookup(rootCaller, parent: root, name: bytes("kept3")).size, 1003)
        // Kept files without layouts and forgotten ones read right (layouts fetched again).
        for (index, ino) in inodes.enumerated() {
            XCTAssertEqual(try contents(of: ino, via: a), payload(index), "kept\(index)")
        }
        // A file closed again is the most recently kept, however often it was closed: closing
        // the oldest kept file many times forgets none of the others.
        let kept = inodes.filter { a.openFile($0) != nil }
        XCTAssertEqual(kept.count, 6)
        for _ in 0..<20 {
            let (again, _) = try a.open(rootCaller, ino: kept[0], flags: O_RDONLY)
            try a.release(handle: again)
        }
        XCTAssertEqual(inodes.filter { a.openFile($0) != nil }, kept)
        XCTAssertEqual(a.lock.withLock { a.keptFiles.count }, 6)
        // The next file kept forgets the least recently closed one, which is now kept[1].
        let (extra, extraHandle) = try create(a, "kept-extra")
        try a.release(handle: extraHandle)
        XCTAssertNil(a.openFile(kept[1]))
        XCTAssertNotNil(a.openFile(kept[0]))
        XCTAssertNotNil(a.openFile(extra))

        // Another agent's change recalls a kept file: the change is seen, not the kept attributes.
        let (handle, _) = try b.open(rootCaller, ino: inodes[4], flags: O_RDWR | O_TRUNC)
        try write(b, handle, at: 0, Array("changed".utf8))
        try b.release(handle: handle)
        XCTAssertEqual(try a.getattr(rootCaller, ino: inodes[4]).size, 7)
        XCTAssertEqual(try contents(of: inodes[4], via: a), Array("changed".utf8))
    }

    func testANewDirectorysMissingNamesAreKnownUntilAnotherAgentChangesIt() throws {
        let a = try makeAgent(), b = try makeAgent()
        let dir = try a.mkdir(rootCaller, parent: root, name: bytes("fresh"), mode: 0o755, umask: 0).ino
        XCTAssertTrue(a.knownAbsent(dir, bytes("x")), "a directory this agent made is known to be empty")
        XCTAssertErrno(ENOENT, try a.lookup(rootCaller, parent: dir, name: bytes("x")))
        XCTAssertFalse(b.knownAbsent(dir, bytes("x")), "not by an agent that did not make it")

        // Own changes keep the set: create, mkdir, symlink, link, rename, unlink.
        let (x, hx) = try a.create(rootCaller, parent: dir, name: bytes("x"), mode: regularFile | 0o644, umask: 0,
                                   flags: O_RDWR)
        try a.release(handle: hx)
        XCTAssertFalse(a.knownAbsent(dir, bytes("x")))
        XCTAssertEqual(try a.lookup(rootCaller, parent: dir, name: bytes("x")).ino, x.ino)
        _ = try a.symlink(rootCaller, parent: dir, name: bytes("s"), target: bytes("x"))
        _ = try a.link(rootCaller, ino: x.ino, newParent: dir, newName: bytes("x2"))
        let sub = try a.mkdir(rootCaller, parent: dir, name: bytes("sub"), mode: 0o755, umask: 0).ino
        for name in ["s", "x2", "sub"] { XCTAssertFalse(a.knownAbsent(dir, bytes(name)), name) }
        XCTAssertTrue(a.knownAbsent(sub, bytes("anything")))
        try a.rename(rootCaller, parent: dir, name: bytes("x2"), newParent: sub, newName: bytes("moved"), flags: [])
        XCTAssertTrue(a.knownAbsent(dir, bytes("x2")))
        XCTAssertFalse(a.knownAbsent(sub, bytes("moved")))
        try a.unlink(rootCaller, parent: sub, name: bytes("moved"))
        XCTAssertTrue(a.knownAbsent(sub, bytes("moved")))
        XCTAssertErrno(ENOENT, try a.lookup(rootCaller, parent: sub, name: bytes("moved")))
        try a.rmdir(rootCaller, parent: dir, name: bytes("sub"))
        XCTAssertTrue(a.knownAbsent(dir, bytes("sub")))

        // Another agent's create recalls the directory first: the name is then found.
        let (y, hy) = try b.create(rootCaller, parent: dir, name: bytes("y"), mode: regularFile | 0o644, umask: 0,
                                   flags: O_RDWR)
        try b.release(handle: hy)
        XCTAssertFalse(a.knownAbsent(dir, bytes("y")), "recalled: nothing is known absent any more")
        XCTAssertFalse(a.knownAbsent(dir, bytes("never")))
        XCTAssertEqual(try a.lookup(rootCaller, parent: dir, name: bytes("y")).ino, y.ino)

        // Another agent's rename into a directory this agent made recalls it too.
        let other = try a.mkdir(rootCaller, parent: root, name: bytes("other"), mode: 0o777, umask: 0).ino
        XCTAssertTrue(a.knownAbsent(other, bytes("arrived")))
        try b.rename(rootCaller, parent: dir, name: bytes("y"), newParent: other, newName: bytes("arrived"), flags: [])
        XCTAssertEqual(try a.lookup(rootCaller, parent: other, name: bytes("arrived")).ino, y.ino)

        // A failed change drops what was known (a failed call may have been applied).
        let third = try a.mkdir(rootCaller, parent: root, name: bytes("third"), mode: 0o755, umask: 0).ino
        XCTAssertTrue(a.knownAbsent(third, bytes("f")))
        XCTAssertErrno(EACCES, try a.create(alice, parent: third, name: bytes("f"), mode: regularFile | 0o644, umask: 0,
                                            flags: O_RDWR))
        XCTAssertFalse(a.knownAbsent(third, bytes("f")))
        XCTAssertErrno(ENOENT, try a.lookup(rootCaller, parent: third, name: bytes("f")))
    }
}

/// A recall of a directory whose entries the kernel cannot drop now (it holds the directory's
/// lock for this agent's own change there, SPEC.md §12.6 "Crossed changes").
extension VFSDataTests {
    /// Stands in for the kernel: entry invalidations wait until `open()`.
    final class HeldDirectoryLock: @unchecked Sendable {
        let gate = DispatchSemaphore(value: 0)
        let lock = NSLock()
        var invalidations = 0
        var openedNs: UInt64 = 0

        func invalidate() {
            gate.wait()
            gate.signal()
            lock.withLock { invalidations += 1 }
        }

        func open() {
            lock.withLock { openedNs = DispatchTime.now().uptimeNanoseconds }
            gate.signal()
        }
    }

    func testARecallDoesNotWaitForAHeldDirectoryLockWhenEveryEntryCanBeMadeStale() throws {
        let a = try makeAgent(), b = try makeAgent()
        let dir = try b.mkdir(rootCaller, parent: root, name: bytes("d"), mode: 0o755, umask: 0).ino
        XCTAssertEqual(try a.lookup(rootCaller, parent: root, name: bytes("d")).ino, dir)   // a holds the lease
        let held = HeldDirectoryLock()
        a.leaseCache.invalidateEntry = { _, _ in held.invalidate() }
        a.leaseCache.expireAllEntries = { true }
        defer { held.open() }

        let began = DispatchTime.now().uptimeNanoseconds
        let (file, handle) = try b.create(rootCaller, parent: dir, name: bytes("new"), mode: regularFile | 0o644,
                                          umask: 0, flags: O_RDWR)
        let tookNs = DispatchTime.now().uptimeNanoseconds - began
        try b.release(handle: handle)
        XCTAssertEqual(a.leaseCache.wholeExpiryCount, 1, "the recall made every entry stale instead of waiting")
        XCTAssertEqual(held.lock.withLock { held.invalidations }, 0, "the kernel's lock is still held")
        XCTAssertLessThan(tookNs, 5_000_000_000, "the create waited for the held lock (\(tookNs / 1_000_000) ms)")
        // The recall still did its work: a's lookup sees the new name.
        XCTAssertEqual(try a.lookup(rootCaller, parent: dir, name: bytes("new")).ino, file.ino)
    }

    func testARecallWaitsForAHeldDirectoryLockWhenTheKernelCannotMakeEveryEntryStale() throws {
        let a = try makeAgent(), b = try makeAgent()
        let dir = try b.mkdir(rootCaller, parent: root, name: bytes("d"), mode: 0o755, umask: 0).ino
        XCTAssertEqual(try a.lookup(rootCaller, parent: root, name: bytes("d")).ino, dir)
        let held = HeldDirectoryLock()
        a.leaseCache.invalidateEntry = { _, _ in held.invalidate() }
        a.leaseCache.expireAllEntries = { false }   // a kernel before Linux 6.16
        DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(300)) { held.open() }

        let (_, handle) = try b.create(rootCaller, parent: dir, name: bytes("new"), mode: regularFile | 0o644,
                                       umask: 0, flags: O_RDWR)
        let returnedNs = DispatchTime.now().uptimeNanoseconds
        try b.release(handle: handle)
        XCTAssertEqual(a.leaseCache.wholeExpiryCount, 0)
        let openedNs = held.lock.withLock { held.openedNs }
        XCTAssertGreaterThan(openedNs, 0, "the create returned before the kernel dropped a's entry")
        XCTAssertLessThan(openedNs, returnedNs, "the create returned before the kernel dropped a's entry")
        XCTAssertGreaterThan(held.lock.withLock { held.invalidations }, 0)
    }
}

extension VFSDataTests {
    /// `security.*` attributes (the kernel asks for `security.capability` before every write)
    /// are answered from what the agent read under the file's lease, until a recall or its own
    /// change; other names always go to the home.
    func testSecurityXattrsAreAnsweredUnderTheLeaseAndFollowEveryChange() throws {
        let a = try makeAgent(), b = try makeAgent()
        let capability = bytes("security.capability")
        let (ino, handle) = try create(a, "capable")
        let file = try XCTUnwrap(a.openFile(ino))
        XCTAssertEqual(file.cachedSecurityXattr(capability), .some(nil), "a file it created has none")
        // Answered here: a value put into the home's metadata behind the leases' back is not seen.
        try fixture.hub.meta.setxattr(rootCaller, ino: ino, name: capability, value: [1, 2, 3], flags: [])
        try write(a, handle, at: 0, Array("bytes".utf8))
        XCTAssertErrno(ENODATA, try a.getxattr(rootCaller, ino: ino, name: capability))
        try fixture.hub.meta.removexattr(rootCaller, ino: ino, name: capability)

        // A file it did not create: the first read asks the home, then its answer is kept.
        let (other, otherHandle) = try create(b, "other")
        try b.release(handle: otherHandle)
        XCTAssertEqual(try contents(of: other, via: a), [])
        XCTAssertEqual(try XCTUnwrap(a.openFile(other)).cachedSecurityXattr(capability), .none)
        XCTAssertErrno(ENODATA, try a.getxattr(rootCaller, ino: other, name: capability))
        XCTAssertEqual(try XCTUnwrap(a.openFile(other)).cachedSecurityXattr(capability), .some(nil),
                       "the absence is kept under the lease")

        // Another agent's change recalls the lease: the next read asks the home again, and
        // keeps nothing until the agent holds the file under a lease again.
        try b.setxattr(rootCaller, ino: ino, name: capability, value: [7, 7], flags: [])
        XCTAssertEqual(try a.getxattr(rootCaller, ino: ino, name: capability), [7, 7])
        XCTAssertEqual(file.cachedSecurityXattr(capability), .none, "the recall ended the file's lease")
        XCTAssertEqual(try contents(of: ino, via: a), Array("bytes".utf8))   // an open: a new lease
        XCTAssertEqual(try a.getxattr(rootCaller, ino: ino, name: capability), [7, 7])
        XCTAssertEqual(file.cachedSecurityXattr(capability), .some([7, 7]))
        // So does this agent's own change.
        try a.removexattr(rootCaller, ino: ino, name: capability)
        XCTAssertEqual(file.cachedSecurityXattr(capability), .none)
        XCTAssertErrno(ENODATA, try a.getxattr(rootCaller, ino: ino, name: capability))
        try a.release(handle: handle)

        // Other namespaces are never kept: their reads depend on the caller.
        let user = bytes("user.note")
        try b.setxattr(rootCaller, ino: ino, name: user, value: [1], flags: [])
        XCTAssertEqual(try a.getxattr(rootCaller, ino: ino, name: user), [1])
        XCTAssertEqual(file.cachedSecurityXattr(user), .none)
        try fixture.hub.meta.setxattr(rootCaller, ino: ino, name: user, value: [2], flags: [])
        XCTAssertEqual(try a.getxattr(rootCaller, ino: ino, name: user), [2], "asked at the home every time")
    }
}
