#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import WeftProto
import XCTest
@testable import WeftChunks

/// Sync passes (SPEC.md §3.2, Durability rule): a large pass spreads its fsyncs over several
/// threads; every descriptor is closed, and a failure anywhere fails the pass once.
final class DurabilityQueueTests: ChunkTestCase {
    private func openDescriptorCount() -> Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? 0
    }

    /// Files written into the store's directory, handed to `queue` as written objects.
    private func register(_ count: Int, in queue: DurabilityQueue, first: SliceID = 0) throws {
        for offset in 0..<count {
            let id = first + SliceID(offset)
            let fd = open("\(directory)/object-\(id)", O_CREAT | O_WRONLY | O_CLOEXEC, 0o644)
            XCTAssertGreaterThanOrEqual(fd, 0)
            XCTAssertEqual(write(fd, [UInt8(truncatingIfNeeded: id)], 1), 1)
            _ = queue.objectWritten(id: id, fd: fd)
        }
    }

    /// The test's directory with its 256 fan-out directories, opened.
    private func makeStoreDirectory() throws -> Int32 {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        for index in 0..<256 {
            try FileManager.default.createDirectory(atPath: "\(directory)/\(FileIO.fanOutName(index))",
                                                    withIntermediateDirectories: true)
        }
        let root = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(root, 0)
        return root
    }

    func testALargePassSyncsAndClosesEveryFileAndAFailureFailsItOnce() throws {
        let root = try makeStoreDirectory()
        defer { close(root) }
        let queue = DurabilityQueue(root: root, logger: log.logger)
        let before = openDescriptorCount()

        // Enough files for every thread of a pass, and deletes in every fan-out directory.
        try register(200, in: queue)
        for id in 0..<256 as Range<SliceID> { queue.objectRemoved(id: id) }
        XCTAssertEqual(openDescriptorCount() - before, 200)
        try queue.sync()
        XCTAssertEqual(openDescriptorCount() - before, 0, "every descriptor closed")

        // One descriptor that cannot be synced (a pipe: EINVAL) among many: the pass fails
        // with EIO, logged once, and still closes everything.
        try register(100, in: queue, first: 1000)
        var pipeEnds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&pipeEnds), 0)
        close(pipeEnds[1])
        _ = queue.objectWritten(id: 5000, fd: pipeEnds[0])
        try register(100, in: queue, first: 2000)
        XCTAssertThrowsError(try queue.sync()) { error in
            XCTAssertEqual((error as? WeftError)?.errno, EIO)
        }
        XCTAssertEqual(openDescriptorCount() - before, 0, "every descriptor closed after a failed pass")
        XCTAssertEqual(log.errors.filter { $0.contains("chunk sync failed") }.count, 1, "\(log.errors)")
        try queue.sync()   // nothing pending: the next pass succeeds
    }

    /// A failed pass (SPEC.md §3.2, "Objects lost to a failed pass"): a later sync finds nothing
    /// of its objects to sync and succeeds, so the objects are remembered as lost until deleted,
    /// and each owner a commit assigned (its inode and session) owes two reports, each given once:
    /// the file's (to its inode, from that session or once the session ended) and the session's.
    func testObjectsOfAFailedPassAreLostAndTheirOwnersToldOnce() throws {
        let root = try makeStoreDirectory()
        defer { close(root) }
        let queue = DurabilityQueue(root: root, logger: log.logger)
        try register(1, in: queue, first: 1)
        var pipeEnds: [Int32] = [0, 0]
        XCTAssertEqual(pipe(&pipeEnds), 0)
        close(pipeEnds[1])
        _ = queue.objectWritten(id: 2, fd: pipeEnds[0])   // fsync of a pipe: EINVAL
        try register(1, in: queue, first: 4)   // written, named by no commit
        try register(1, in: queue, first: 6)
        XCTAssertEqual(queue.assign([1, 99], inode: 42, session: 7), [])
        XCTAssertEqual(queue.assign([2], inode: 43, session: 8), [])
        XCTAssertEqual(queue.assign([6], inode: 44, session: 10), [])
        XCTAssertEqual(queue.lostObjects([1, 2]), [], "nothing lost before a pass")
        XCTAssertFalse(queue.takeFailure(session: 7))

        XCTAssertThrowsError(try queue.sync()) { XCTAssertEqual(($0 as? WeftError)?.errno, EIO) }
        try queue.sync()   // what the failure is about: nothing left to sync, so success
        XCTAssertEqual(queue.lostObjects([1, 2, 3, 4, 6]), [1, 2, 4, 6], "the whole pass is lost, not only the file that failed")
        XCTAssertEqual(queue.assign([2, 5], inode: 50, session: 9), [2], "a commit naming a lost object learns it")
        XCTAssertFalse(queue.takeFailure(inode: 50, session: 9), "and becomes no owner of it")
        // The session's report and the file's: each once, neither takes the other.
        XCTAssertTrue(queue.takeFailure(session: 7))
        XCTAssertFalse(queue.takeFailure(session: 7), "told once")
        XCTAssertFalse(queue.takeFailure(inode: 42, session: 8), "another live session's failure is not its to hear")
        XCTAssertTrue(queue.takeFailure(inode: 42, session: 7), "the file's report stays after the session's")
        XCTAssertFalse(queue.takeFailure(inode: 42, session: 7), "told once")
        XCTAssertTrue(queue.takeFailure(inode: 43, session: 8))
        XCTAssertFalse(queue.takeFailure(inode: 43, session: 8), "told once")
        XCTAssertTrue(queue.takeFailure(session: 8), "the session's report stays after the file's")
        XCTAssertFalse(queue.takeFailure(session: 8), "told once")
        XCTAssertFalse(queue.takeFailure(session: 9), "a session with nothing in the pass")
        XCTAssertFalse(queue.takeFailure(inode: 7, session: 7), "sessions and inodes are apart")
        queue.forgetSession(10)
        XCTAssertFalse(queue.takeFailure(session: 10), "a session's failures go with the session")
        XCTAssertTrue(queue.takeFailure(inode: 44, session: 11), "its inodes' stay, for any session")
        XCTAssertFalse(queue.takeFailure(inode: 44, session: 10), "told once")

        queue.objectRemoved(id: 1)
        XCTAssertEqual(queue.lostObjects([1, 2]), [2], "a deleted object leaves the lost set")

        // A later pass that succeeds loses nothing and tells no one.
        try register(1, in: queue, first: 3)
        XCTAssertEqual(queue.assign([3], inode: 42, session: 7), [])
        try queue.sync()
        XCTAssertEqual(queue.lostObjects([3]), [])
        XCTAssertFalse(queue.takeFailure(session: 7))
        XCTAssertFalse(queue.takeFailure(inode: 42, session: 7))
    }

    /// A commit that names an object while another caller's pass holds it (taken before the
    /// commit, failing after it) makes its inode and session owners all the same.
    func testOwnersAssignedWhileThePassRunsAreToldWhenItFails() throws {
        let root = try makeStoreDirectory()
        defer { close(root) }
        let queue = DurabilityQueue(root: root, logger: log.logger)
        try register(1, in: queue, first: 5)
        let inPass = DispatchSemaphore(value: 0)
        let go = DispatchSemaphore(value: 0)
        queue.testSyncFailure = { _ in
            inPass.signal()
            go.wait()
            return EIO
        }
        let done = DispatchSemaphore(value: 0)
        let failure = Mutex<Int32>(0)
        Thread.detachNewThread {
            do { try queue.sync() } catch { failure.withLock { $0 = (error as? WeftError)?.errno ?? -1 } }
            done.signal()
        }
        XCTAssertEqual(inPass.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(queue.assign([5], inode: 77, session: 3), [], "not lost yet: its pass still runs")
        go.signal()
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success)
        XCTAssertEqual(failure.withLock { $0 }, EIO, "the pass failed")
        XCTAssertEqual(queue.lostObjects([5]), [5])
        XCTAssertTrue(queue.takeFailure(inode: 77, session: 3))
        XCTAssertFalse(queue.takeFailure(inode: 77, session: 3), "told once, to the file")
        XCTAssertTrue(queue.takeFailure(session: 3), "and once to the session")
    }

    /// A failed pass of the objects the journal carries (SPEC.md §5): its own objects, and those
    /// whose records were being written meanwhile (once written), wait to be written again from
    /// their keys instead of being synced; one whose rewrite failed waits again; one waiting for
    /// a normal pass is no longer taken by the journal.
    func testAFailedJournaledPassLeavesEveryObjectTheJournalCarriesToBeWrittenAgain() throws {
        let store = try makeStore()
        for id: SliceID in 1...3 { try store.write(id: id, data: [UInt8](repeating: UInt8(id), count: 100)) }
        XCTAssertEqual(store.coverByJournal([1, 2]), [1, 2])
        store.journalCommitted([1])   // 1's record is written; 2's is being written
        store.testSyncfsFailure = { EIO }
        store.testSyncFailure = { _ in EIO }
        XCTAssertThrowsError(try store.syncJournaled()) { XCTAssertTrue($0 is JournaledSyncFailure, "\($0)") }
        XCTAssertEqual(store.takeRewriteNeeded(), [1], "the pass's object")
        XCTAssertEqual(store.coverByJournal([3]), [], "3 waited for a normal pass when it failed: only its own descriptor can still be told")
        XCTAssertTrue(store.awaitsSync(id: 3), "3 stays with the normal passes")
        XCTAssertEqual(store.journaledCount, 1, "2 is still being covered")
        store.journalCommitted([2])
        XCTAssertEqual(store.takeRewriteNeeded(), [2], "its record came after the failure: written again too, not synced")
        XCTAssertEqual(try store.syncJournaled(), [], "nothing queued until the rewrites give them back")
        store.needRewrite([2])
        XCTAssertEqual(store.journaledCount, 1, "an object whose rewrite failed still counts")
        XCTAssertEqual(store.takeRewriteNeeded(), [2])
        store.testSyncfsFailure = nil
        store.testSyncFailure = nil
        try store.rewriteJournaled(id: 2, raw: [UInt8](repeating: 2, count: 100))
        store.requeueJournaled([2])
        XCTAssertEqual(try store.syncJournaled(), [2])
        XCTAssertEqual(try store.read(id: 2, offset: 0, length: 100), [UInt8](repeating: 2, count: 100))
        XCTAssertEqual(store.objectCount, 3, "a rewrite replaces, it adds no object")
    }

    /// fsck writes a carried object again after damage removed its file (`Hub.rewriteCarried`):
    /// the store counted it when it was written and keeps counting it, once, with its bytes.
    func testRewriteOfAVanishedObjectKeepsTheCounts() throws {
        let store = try makeStore()
        let raw = [UInt8](repeating: 9, count: 300)
        for id: SliceID in 1...2 { try store.write(id: id, data: raw) }
        let (objects, bytes) = (store.objectCount, store.storedBytes)
        XCTAssertEqual(unlink(objectPath(2)), 0)
        XCTAssertFalse(store.exists(id: 2))
        try store.rewriteJournaled(id: 2, raw: raw)
        XCTAssertEqual(try store.read(id: 2, offset: 0, length: raw.count), raw)
        XCTAssertEqual(store.objectCount, objects, "the vanished object was still counted")
        XCTAssertEqual(store.storedBytes, bytes)
        try store.rewriteJournaled(id: 1, raw: raw)
        XCTAssertEqual(store.objectCount, objects, "a rewrite of a present object adds none")
        XCTAssertEqual(store.storedBytes, bytes)
        try store.delete(ids: [1, 2])
        XCTAssertEqual(store.objectCount, 0)
        XCTAssertEqual(store.storedBytes, 0)
    }
}
