#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftTestSupport
import XCTest
import WeftProto
@testable import WeftMeta

/// Everything survives close and reopen; counters track the namespace; concurrent mutations
/// share fsyncs (group commit) and are all durable.
final class PersistenceTests: MetaStoreTestCase {
    func testEverythingSurvivesReopen() throws {
        let directory = try makeDirectory("dir", mode: 0o750)
        let file = try makeFile("file", in: directory.ino, mode: 0o600)
        _ = try store.link(Callers.root, ino: file.ino, newParent: root, newName: bytes("hard"))
        let link = try store.symlink(Callers.root, parent: directory.ino, name: bytes("sym"), target: bytes("file"))
        try store.setxattr(Callers.root, ino: directory.ino, name: bytes("user.k"), value: [1, 2, 3], flags: [])
        let commit = try slice(1, offset: 7, length: 70)
        let written = try store.commitSlices(ino: file.ino, slices: [commit], minimumSize: UInt64(Self.chunkSizeBytes) + 77,
                                             durable: false)
        _ = try store.setattr(Callers.root, ino: file.ino, SetAttributes(uid: 5, gid: 6))
        try store.rename(Callers.root, parent: root, name: bytes("hard"), newParent: root, newName: bytes("renamed"),
                         flags: [])
        let changed = try store.getattr(file.ino)
        let counters = store.currentCounters
        let rootBefore = try store.getattr(root)
        let directoryBefore = try store.getattr(directory.ino)

        try reopen()

        XCTAssertEqual(try store.getattr(root), rootBefore)
        XCTAssertEqual(try store.getattr(directory.ino), directoryBefore)
        XCTAssertEqual(try lookup("file", in: directory.ino), changed)
        XCTAssertEqual(try lookup("renamed").ino, file.ino)
        XCTAssertErrno(ENOENT, try lookup("hard"))
        XCTAssertEqual(changed.size, written.size)
        XCTAssertEqual(changed.nlink, 2)
        XCTAssertEqual(try store.readlink(link.ino), bytes("file"))
        XCTAssertEqual(try store.getxattr(Callers.root, ino: directory.ino, name: bytes("user.k")), [1, 2, 3])
        XCTAssertEqual(try store.layout(ino: file.ino, firstChunk: 0, count: 2).1, [[], [commit.slice]])
        XCTAssertEqual(try names(in: directory.ino), ["file", "sym"])
        XCTAssertEqual(store.currentCounters.inodes, counters.inodes)
        XCTAssertEqual(store.currentCounters.logicalBytes, counters.logicalBytes)
        XCTAssertEqual(store.currentCounters.nextSlice, counters.nextSlice)
        XCTAssertEqual(store.volume.chunkSizeBytes, Self.chunkSizeBytes)
        XCTAssertEqual(store.volume.uuid, Array(repeating: 7, count: 16))
        // New inodes continue after the old ones.
        XCTAssertGreaterThan(try makeFile("new").ino, link.ino)
        try assertConsistent()
    }

    func testCountersFollowTheNamespace() throws {
        XCTAssertEqual(store.currentCounters.inodes, 1)
        XCTAssertEqual(store.currentCounters.logicalBytes, 0)
        let a = try makeFile("a")
        let d = try makeDirectory("d")
        _ = try store.symlink(Callers.root, parent: d.ino, name: bytes("s"), target: bytes("x"))
        XCTAssertEqual(store.currentCounters.inodes, 4)
        _ = try store.commitSlices(ino: a.ino, slices: [try slice(0, offset: 0, length: 10)], minimumSize: 1000,
                                   durable: true)
        XCTAssertEqual(store.currentCounters.logicalBytes, 1000)
        _ = try store.setattr(Callers.root, ino: a.ino, SetAttributes(size: 300))
        XCTAssertEqual(store.currentCounters.logicalBytes, 300)
        let b = try makeFile("b")
        _ = try store.setattr(Callers.root, ino: b.ino, SetAttributes(size: 5000))
        XCTAssertEqual(store.currentCounters.logicalBytes, 5300, "a sparse size counts too")
        try store.unlink(Callers.root, parent: root, name: bytes("a"))
        XCTAssertEqual(store.currentCounters.logicalBytes, 5000)
        XCTAssertEqual(store.currentCounters.inodes, 4)
        try store.unlink(Callers.root, parent: d.ino, name: bytes("s"))
        try store.rmdir(Callers.root, parent: root, name: bytes("d"))
        XCTAssertEqual(store.currentCounters.inodes, 2)
        // Failed operations move no counter.
        XCTAssertErrno(EEXIST, try makeFile("b"))
        XCTAssertErrno(ENOENT, try store.unlink(Callers.root, parent: root, name: bytes("a")))
        XCTAssertEqual(store.currentCounters.inodes, 2)
        try reopen()
        XCTAssertEqual(store.currentCounters.inodes, 2)
        XCTAssertEqual(store.currentCounters.logicalBytes, 5000)
        try assertConsistent()
    }

    /// Runs `body(store, thread)` on `threads` threads at once; returns the errors they threw.
    /// The store reference ends with this call, so that `reopen()` can close the database.
    private func runConcurrently(threads: Int, _ body: @escaping (MetaStore, Int) throws -> Void) -> [String] {
        let store = self.store!
        let lock = NSLock()
        var errors: [String] = []
        DispatchQueue.concurrentPerform(iterations: threads) { thread in
            do { try body(store, thread) } catch {
                lock.lock(); errors.append("thread \(thread): \(error)"); lock.unlock()
            }
        }
        return errors
    }

    func testConcurrentCreatesAreAllDurable() throws {
        let threads = 16
        let filesPerThread = 60
        let directories = try (0..<4).map { try makeDirectory("d\($0)").ino }
        let lock = NSLock()
        var created: [InodeID] = []
        let errors = runConcurrently(threads: threads) { store, thread in
            for index in 0..<filesPerThread {
                let parent = directories[(thread + index) % directories.count]
                let attributes = try store.create(Callers.root, parent: parent, name: bytes("t\(thread)-\(index)"),
                                                  mode: FileType.regular | 0o644, rdev: 0, umask: 0, exclusive: true)
                // Interleave other mutations so that group commits mix kinds of change.
                if index % 10 == 0 {
                    try store.setxattr(Callers.root, ino: attributes.ino, name: bytes("user.n"), value: [UInt8(index)],
                                       flags: [])
                }
                lock.lock(); created.append(attributes.ino); lock.unlock()
            }
        }
        XCTAssertEqual(errors, [])
        XCTAssertEqual(Set(created).count, threads * filesPerThread, "every create got its own inode")
        let total = 1 + directories.count + threads * filesPerThread
        XCTAssertEqual(store.currentCounters.inodes, UInt64(total))

        try reopen()

        var found: Set<String> = []
        for directory in directories {
            let names = try names(in: directory)
            XCTAssertEqual(names.count, Set(names).count)
            found.formUnion(names)
        }
        let expected = Set((0..<threads).flatMap { thread in (0..<filesPerThread).map { "t\(thread)-\($0)" } })
        XCTAssertEqual(found, expected)
        XCTAssertEqual(store.currentCounters.inodes, UInt64(total))
        XCTAssertEqual(try store.getxattr(Callers.root, ino: try lookup("t3-10", in: directories[1]).ino,
                                          name: bytes("user.n")), [10])
        try assertConsistent()
    }

    func testConcurrentMixedMutationsStayConsistent() throws {
        let threads = 8
        let rounds = 40
        let errors = runConcurrently(threads: threads) { store, thread in
            let own = try store.mkdir(Callers.root, parent: InodeNumbers.root, name: bytes("w\(thread)"), mode: 0o755,
                                      umask: 0)
            for round in 0..<rounds {
                let name = bytes("f\(round)")
                let file = try store.create(Callers.root, parent: own.ino, name: name, mode: FileType.regular | 0o644,
                                            rdev: 0, umask: 0, exclusive: true)
                let id = try store.allocateSliceIDs(count: 1)
                let commit = SliceCommit(chunkIndex: 0, slice: Slice(id: id, offsetInChunk: 0, length: 10, objectLength: 10))
                _ = try store.commitSlices(ino: file.ino, slices: [commit], minimumSize: 10, durable: true)
                if round % 3 == 0 {
                    try store.rename(Callers.root, parent: own.ino, name: name, newParent: InodeNumbers.root,
                                     newName: bytes("moved-\(thread)-\(round)"), flags: [])
                } else if round % 3 == 1 {
                    try store.unlink(Callers.root, parent: own.ino, name: name)
                }
            }
        }
        XCTAssertEqual(errors, [])
        try reopen()
        try assertConsistent()
        let rootNames = try names(in: root)
        XCTAssertEqual(rootNames.filter { $0.hasPrefix("moved-") }.count, threads * ((rounds + 2) / 3))
        for thread in 0..<threads {
            XCTAssertEqual(try names(in: try lookup("w\(thread)").ino).count, rounds / 3)
        }
        XCTAssertEqual(store.currentCounters.logicalBytes, UInt64(10 * threads * (rounds - (rounds + 1) / 3)))
    }

    func testPeriodicDurabilityAlsoPersistsOnClose() throws {
        try store.close()
        store = nil
        store = try MetaStore(path: path, durability: .periodic, logger: testLogger("weft.meta.test"))
        XCTAssertEqual(store.durability, .periodic)
        let file = try makeFile("p")
        usleep(100_000)   // the sync thread is now in its first one-second sleep
        try store.close()
        weak let closed = store
        store = nil
        // BUG (Sources/WeftMeta/MetaStore.swift, MetaStore.close / the periodic sync thread):
        // close() only sets `stopping`; the "weft-meta-sync" thread runs `while let self, ...`
        // and so holds a strong reference through its `Thread.sleep(1)`. The store, and with it
        // the RocksDB handle and its LOCK, outlives close() and its owner's last reference by up
        // to a second, so reopening the volume right away fails with EBUSY ("lock hold by
        // current process"). Expected: close() stops (joins) the thread, so the store goes away
        // with its last reference.
        XCTAssertNil(closed, "a closed store must not be kept alive by its sync thread")
        // Let the rest of the test check durability whatever the outcome above.
        let deadline = Date().addingTimeInterval(5)
        while true {
            do {
                store = try MetaStore(path: path, durability: .strict, logger: testLogger("weft.meta.test"))
                break
            } catch let error as WeftError where error.errno == EBUSY && Date() < deadline {
                usleep(50_000)
            }
        }
        XCTAssertEqual(try lookup("p").ino, file.ino)
    }

    /// A full file system is ENOSPC, not EIO (SPEC.md §9.1): the caller reports a full volume.
    func testRocksDBErrorsOnAFullDiskAreENOSPC() {
        XCTAssertEqual(RocksDB.errno(forMessage: "IO error: No space left on device: While appending to file: /h/meta/000012.log"),
                       ENOSPC)
        XCTAssertEqual(RocksDB.errno(forMessage: "IO error: NoSpace: write failed"), ENOSPC)
        XCTAssertEqual(RocksDB.errno(forMessage: "Corruption: block checksum mismatch"), EIO)
        XCTAssertEqual(RocksDB.errno(forMessage: ""), EIO)
    }
}
