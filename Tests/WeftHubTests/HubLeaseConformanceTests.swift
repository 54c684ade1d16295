import Foundation
import WeftHub
import WeftProto
import WeftTestSupport
import XCTest

/// A lease client that records what the home recalls, and can act inside a recall (as an agent
/// commits its buffered writes there).
final class RecordingLeaseClient: LeaseClient, @unchecked Sendable {
    struct Recall: Equatable {
        var ino: InodeID
        var names: [[UInt8]]
        var notice: Bool
    }

    private let lock = NSLock()
    private var recorded: [Recall] = []
    /// Runs inside each full recall, before it is answered.
    var onRecall: ((InodeID) -> Void)?
    /// What `recall` answers (in process: false plays a holder that cannot be reached).
    var answers = true
    var heardNs: UInt64?

    func recall(_ ino: InodeID, names: [[UInt8]], notice: Bool, deadlineNs: UInt64) -> Bool {
        lock.withLock { recorded.append(Recall(ino: ino, names: names, notice: notice)) }
        if !notice { onRecall?(ino) }
        return answers
    }

    var lastHeardNs: UInt64 { heardNs ?? Leases.nowNs() }
    func leasesLost() {}

    var all: [Recall] { lock.withLock { recorded } }
    /// Full recalls (not notices).
    var recalls: [Recall] { all.filter { !$0.notice } }
    var notices: [Recall] { all.filter(\.notice) }
    func reset() { lock.withLock { recorded.removeAll() } }
}

/// Leases and recalls through the hub API (SPEC.md §12.6): the same assertions in-process and
/// over TCP (where recalls travel as callback frames and are answered on the connection).
extension HubConformanceTests {
    /// A second session with leases enabled, and its recorder.
    private func leasedSession(_ name: String = "holder") throws -> (RequestContext, RecordingLeaseClient) {
        let (other, _) = try api.openSession(agentName: name)
        let client = RecordingLeaseClient()
        try api.enableLeases(other, client: client)
        return (RequestContext(session: other, credentials: rootCaller), client)
    }

    func testAChangeRecallsEveryOtherHolderBeforeItReturns() throws {
        let file = try makeFile("leased")
        let untouched = try makeFile("untouched")
        let (holder, client) = try leasedSession()
        _ = try api.getattr(holder, ino: file.ino)

        _ = try api.setattr(context, ino: file.ino, SetAttributes(mode: 0o600))
        XCTAssertEqual(client.recalls, [.init(ino: file.ino, names: [], notice: false)],
                       "the holder is recalled before the change returns")
        // A file the holder never read is not recalled.
        client.reset()
        _ = try api.setattr(context, ino: untouched.ino, SetAttributes(mode: 0o600))
        XCTAssertEqual(client.recalls, [])
        // The changer itself is never recalled for its own change.
        _ = try api.getattr(holder, ino: untouched.ino)
        _ = try api.setattr(holder, ino: untouched.ino, SetAttributes(mode: 0o640))
        XCTAssertEqual(client.recalls, [])
    }

    func testEntryChangesRecallTheDirectoryWithTheNamesAndKeepItsLease() throws {
        let file = try makeFile("gone")
        let (holder, client) = try leasedSession()
        XCTAssertEqual(try api.lookup(holder, parent: root, name: bytes("gone")).ino, file.ino)

        try api.unlink(context, parent: root, name: bytes("gone"))
        XCTAssertTrue(client.recalls.contains(.init(ino: root, names: [bytes("gone")], notice: false)), "\(client.all)")
        XCTAssertTrue(client.recalls.contains(.init(ino: file.ino, names: [], notice: false)), "the unlinked file's links changed")
        // The directory lease stays (the holder still caches the directory's other names).
        client.reset()
        try makeFile("new")
        XCTAssertEqual(client.recalls, [.init(ino: root, names: [bytes("new")], notice: false)])
        client.reset()
        try api.rename(context, parent: root, name: bytes("new"), newParent: root, newName: bytes("renamed"), flags: [])
        XCTAssertEqual(client.recalls.first, .init(ino: root, names: [bytes("new"), bytes("renamed")], notice: false))
    }

    /// Another change replaces a name between an unlink's lookup of it (which says what to
    /// recall) and the unlink's apply, and a holder reads the file that now has the name: the
    /// unlink is made again, recalling that file (SPEC.md §12.6, "A racing rename"). Without it
    /// the holder kept the file's attributes (a link count of 1) after it was gone.
    func testARemovalWhoseNameAnotherChangeReplacedMeanwhileRecallsTheFileItRemoves() throws {
        try makeFile("name")
        let second = try makeFile("other")
        let (holder, client) = try leasedSession()
        _ = try api.lookup(holder, parent: root, name: bytes("name"))
        let racer = RequestContext(session: try api.openSession(agentName: "racer").0, credentials: rootCaller)
        let hub = fixture.hub!
        let raced = NSLock()
        var races = 0
        hub.testBeforeNamesApply = { [root] in
            guard raced.withLock({ races += 1; return races == 1 }) else { return }
            do {
                try hub.rename(racer, parent: root, name: bytes("other"), newParent: root, newName: bytes("name"), flags: [])
                let seen = try hub.getattr(holder, ino: second.ino)
                XCTAssertEqual(seen.nlink, 1)
            } catch {
                XCTFail("the racing change failed: \(error)")
            }
        }
        defer { hub.testBeforeNamesApply = nil }
        client.reset()
        try api.unlink(context, parent: root, name: bytes("name"))
        XCTAssertEqual(raced.withLock { races }, 3, "the unlink twice, the racing rename once")
        XCTAssertEqual(hub.namesChangedUnderfoot, 1)
        XCTAssertTrue(client.recalls.contains { $0.ino == second.ino && $0.notice == false },
                      "the file the unlink removed was recalled: \(client.all)")
        XCTAssertErrno(ENOENT, try api.lookup(context, parent: root, name: bytes("name")))
        XCTAssertErrno(ENOENT, try api.lookup(context, parent: root, name: bytes("other")))
    }

    /// The same for a rename whose target another change creates meanwhile.
    func testARenameWhoseTargetAnotherChangeCreatedMeanwhileRecallsTheFileItReplaces() throws {
        let moved = try makeFile("source")
        let (holder, client) = try leasedSession()
        XCTAssertErrno(ENOENT, try api.lookup(holder, parent: root, name: bytes("target")))
        let racer = RequestContext(session: try api.openSession(agentName: "racer").0, credentials: rootCaller)
        let hub = fixture.hub!
        let raced = NSLock()
        var races = 0
        var created: Attributes?
        hub.testBeforeNamesApply = { [root] in
            guard raced.withLock({ races += 1; return races == 1 }) else { return }
            do {
                let made = try hub.create(racer, parent: root, name: bytes("target"), mode: regularFile | 0o644, rdev: 0,
                                          umask: 0, exclusive: true)
                created = made
                _ = try hub.getattr(holder, ino: made.ino)
            } catch {
                XCTFail("the racing change failed: \(error)")
            }
        }
        defer { hub.testBeforeNamesApply = nil }
        client.reset()
        try api.rename(context, parent: root, name: bytes("source"), newParent: root, newName: bytes("target"), flags: [])
        let replaced = try XCTUnwrap(created)
        XCTAssertEqual(raced.withLock { races }, 2, "the rename was applied twice")
        XCTAssertEqual(hub.namesChangedUnderfoot, 1)
        XCTAssertTrue(client.recalls.contains { $0.ino == replaced.ino && $0.notice == false },
                      "the file the rename replaced was recalled: \(client.all)")
        XCTAssertEqual(try api.lookup(context, parent: root, name: bytes("target")).ino, moved.ino)
    }

    func testAFileLeaseEndsWithItsRecall() throws {
        let file = try makeFile("truncated")
        let (holder, client) = try leasedSession()
        _ = try api.open(holder, ino: file.ino, flags: O_RDONLY)
        _ = try api.open(context, ino: file.ino, flags: O_WRONLY | O_TRUNC)
        XCTAssertEqual(client.recalls.map(\.ino), [file.ino])
        // Recalled once: the holder has not read it again, so the next change recalls nobody.
        _ = try api.open(context, ino: file.ino, flags: O_WRONLY | O_TRUNC)
        XCTAssertEqual(client.recalls.map(\.ino), [file.ino])
    }

    /// An open that first recalls another session's write lease reads again, and still counts
    /// as one open: one release ends it. Before, each repeat registered the open once more, and
    /// the unlinked file stayed until the reader's session ended.
    func testAnOpenThatRecallsAWriterIsRegisteredOnce() throws {
        let (writer, writerClient) = try leasedSession("writer")
        let reader = try leasedSession("reader")
        for (name, open) in [("by-open", { (ino: InodeID) in _ = try self.api.open(reader.0, ino: ino, flags: O_RDONLY) }),
                             ("by-openLayout", { (ino: InodeID) in
                                 _ = try self.api.openLayout(reader.0, ino: ino, flags: O_RDONLY, chunkCount: 8, dataMaxBytes: 0) })] {
            let file = try makeFile(name)
            writerClient.reset()
            XCTAssertTrue(try api.acquireWriteLease(writer, ino: file.ino))
            try open(file.ino)
            XCTAssertEqual(writerClient.recalls.map(\.ino), [file.ino], name)
            try api.unlink(context, parent: root, name: bytes(name))
            XCTAssertEqual(try api.getattr(context, ino: file.ino).nlink, 0, name)
            try api.release(reader.0, ino: file.ino)
            XCTAssertErrno(ENOENT, try api.getattr(context, ino: file.ino), "\(name): one open, one release")
        }
    }

    func testAReaderRecallsTheWriteLeaseAndSeesWhatTheWriterCommitted() throws {
        let file = try makeFile("written")
        let (writer, writerClient) = try leasedSession("writer")
        XCTAssertTrue(try api.acquireWriteLease(writer, ino: file.ino))
        // The writer "commits its buffered writes" inside the recall, as an agent does.
        writerClient.onRecall = { [api] ino in
            _ = try? api!.setattr(writer, ino: ino, SetAttributes(size: 12345))
        }
        let reader = try leasedSession("reader")
        XCTAssertEqual(try api.getattr(reader.0, ino: file.ino).size, 12345, "the read waited for the writer's commit")
        XCTAssertEqual(writerClient.recalls.map(\.ino), [file.ino])
        XCTAssertEqual(reader.1.recalls, [], "the writer's own commit inside its recall recalls nobody")

        // Two writers: the second one's request recalls the first, and neither holds it.
        writerClient.onRecall = nil
        XCTAssertTrue(try api.acquireWriteLease(reader.0, ino: file.ino), "the recalled writer holds nothing now")
        XCTAssertFalse(try api.acquireWriteLease(writer, ino: file.ino), "a second writer gets no write lease")
        XCTAssertEqual(reader.1.recalls.map(\.ino), [file.ino])
        // Write leases are for regular files.
        XCTAssertErrno(EINVAL, try api.acquireWriteLease(writer, ino: root))
    }

    func testCreateOpenCreatesOpensLeasesAndReturnsTheParent() throws {
        let (creator, creatorClient) = try leasedSession("creator")
        let (watcher, watcherClient) = try leasedSession("watcher")
        let directory = try api.mkdir(context, parent: root, name: bytes("d"), mode: 0o777, umask: 0)
        _ = try api.getattr(watcher, ino: directory.ino)
        let before = try api.getattr(context, ino: directory.ino)
        let aliceCreator = RequestContext(session: creator.session, credentials: alice)

        // Mode 0o400: the creator may still open its new file for writing.
        let created = try api.createOpen(aliceCreator, parent: directory.ino, name: bytes("new"), mode: regularFile | 0o400,
                                         umask: 0o022, flags: O_WRONLY | O_CREAT | O_EXCL, writeLease: true)
        XCTAssertTrue(created.writeLeased, "nobody else can hold a lease on a new file")
        XCTAssertEqual(created.attributes.mode, regularFile | 0o400)
        XCTAssertEqual(created.attributes.uid, alice.uid)
        XCTAssertEqual(try api.lookup(context, parent: directory.ino, name: bytes("new")).ino, created.attributes.ino)
        let createdParent = try XCTUnwrap(created.parent, "the hub reads the parent inside the change")
        XCTAssertEqual(createdParent.ino, directory.ino)
        XCTAssertEqual(createdParent, try api.getattr(context, ino: directory.ino), "the parent as it is after the change")
        XCTAssertGreaterThanOrEqual(createdParent.mtimeNs, before.mtimeNs)
        XCTAssertTrue(watcherClient.recalls.contains(.init(ino: directory.ino, names: [bytes("new")], notice: false)),
                      "other holders of the directory are recalled: \(watcherClient.all)")
        XCTAssertEqual(creatorClient.recalls, [], "the creator is not recalled for its own change")

        // The write lease is real: another session's reader recalls it.
        _ = try api.getattr(watcher, ino: created.attributes.ino)
        XCTAssertEqual(creatorClient.recalls.map(\.ino), [created.attributes.ino])

        // The open is registered: an unlink keeps the file until its release.
        let u0 = Date()
        try api.unlink(context, parent: directory.ino, name: bytes("new"))
        print("UNLINK TOOK", Date().timeIntervalSince(u0), creatorClient.all, watcherClient.all)
        XCTAssertEqual(try api.getattr(context, ino: created.attributes.ino).nlink, 0)
        try api.release(creator, ino: created.attributes.ino)
        XCTAssertErrno(ENOENT, try api.getattr(context, ino: created.attributes.ino))

        // Without asking, no write lease.
        let plain = try api.createOpen(creator, parent: root, name: bytes("plain"), mode: regularFile | 0o644, umask: 0,
                                       flags: O_RDWR | O_CREAT, writeLease: false)
        XCTAssertFalse(plain.writeLeased)
        XCTAssertEqual(plain.parent?.ino, root)
    }

    /// `stat(path)` is a lookup, then a `getattr` of the inode found: when another session
    /// removes that inode in between, the `getattr` answers with its last attributes (and a
    /// notice: nothing caches them), as a local `stat` would have; the remover gets ENOENT.
    func testAnInodeAnotherSessionRemovedAMomentAgoAnswersGetattrWithItsLastAttributes() throws {
        let (reader, client) = try leasedSession("reader")
        let victim = try makeFile("victim")
        let replacement = try makeFile("replacement")
        XCTAssertEqual(try api.lookup(reader, parent: root, name: bytes("victim")).ino, victim.ino)
        try api.rename(context, parent: root, name: bytes("replacement"), newParent: root, newName: bytes("victim"),
                       flags: [])
        let last = try api.getattr(reader, ino: victim.ino)
        XCTAssertEqual(last.ino, victim.ino)
        XCTAssertEqual(last.nlink, 1, "as it was before the rename replaced it")
        XCTAssertTrue(client.all.contains(.init(ino: victim.ino, names: [], notice: true)), "\(client.all)")
        XCTAssertErrno(ENOENT, try api.getattr(context, ino: victim.ino), "the remover knows it is gone")
        XCTAssertEqual(try api.lookup(reader, parent: root, name: bytes("victim")).ino, replacement.ino)

        let doomed = try makeFile("doomed")
        try api.unlink(context, parent: root, name: bytes("doomed"))
        XCTAssertEqual(try api.getattr(reader, ino: doomed.ino).ino, doomed.ino)
        XCTAssertErrno(ENOENT, try api.getattr(reader, ino: 987_654), "never existed")
    }

    func testUnlinkEntryUnlinksAndReturnsTheParentAfterIt() throws {
        let (holder, client) = try leasedSession("holder")
        let directory = try api.mkdir(context, parent: root, name: bytes("d"), mode: 0o755, umask: 0)
        let file = try makeFile("f", in: directory.ino)
        XCTAssertEqual(try api.lookup(holder, parent: directory.ino, name: bytes("f")).ino, file.ino)
        let before = try api.getattr(context, ino: directory.ino)

        let parent = try XCTUnwrap(try api.unlinkEntry(context, parent: directory.ino, name: bytes("f")))
        XCTAssertEqual(parent, try api.getattr(context, ino: directory.ino), "the parent as it is after the change")
        XCTAssertGreaterThanOrEqual(parent.mtimeNs, before.mtimeNs)
        XCTAssertErrno(ENOENT, try api.lookup(context, parent: directory.ino, name: bytes("f")))
        XCTAssertErrno(ENOENT, try api.getattr(context, ino: file.ino))
        XCTAssertTrue(client.recalls.contains(.init(ino: directory.ino, names: [bytes("f")], notice: false)),
                      "holders of the directory are recalled as by unlink: \(client.all)")

        // Errors as unlink's, and nothing changes.
        XCTAssertErrno(ENOENT, try api.unlinkEntry(context, parent: directory.ino, name: bytes("f")))
        _ = try api.mkdir(context, parent: directory.ino, name: bytes("sub"), mode: 0o755, umask: 0)
        XCTAssertErrno(EISDIR, try api.unlinkEntry(context, parent: directory.ino, name: bytes("sub")))
        try makeFile("kept", in: directory.ino)
        XCTAssertErrno(EACCES, try api.unlinkEntry(caller(alice), parent: directory.ino, name: bytes("kept")))
        XCTAssertNoThrow(try api.lookup(context, parent: directory.ino, name: bytes("kept")))
    }

    /// The agent's kernel holds the directory locked during a create or unlink, and answering a
    /// recall of that directory needs the lock: the parent's attributes must not come from a
    /// read that waits for another change of the directory (which waits for that answer).
    func testCreateOpenAndUnlinkEntryDoNotWaitForAChangeWaitingOnTheCallersRecall() throws {
        let (caller, callerClient) = try leasedSession("caller")
        let directory = try api.mkdir(context, parent: root, name: bytes("d"), mode: 0o777, umask: 0)
        try makeFile("victim", in: directory.ino)
        _ = try api.getattr(caller, ino: directory.ino)   // the caller holds the directory's lease

        final class Gate: @unchecked Sendable {
            let released = DispatchSemaphore(value: 0)
            var timedOut = false
        }
        let gate = Gate()
        var blocked = true
        callerClient.onRecall = { _ in
            guard blocked else { return }
            blocked = false
            // As the agent does: the recall waits for the directory lock its create holds.
            gate.timedOut = gate.released.wait(timeout: .now() + 20) == .timedOut
        }
        let changerDone = DispatchSemaphore(value: 0)
        let changerContext = context
        Thread.detachNewThread { [api] in
            _ = try? api!.create(changerContext, parent: directory.ino, name: bytes("other"), mode: regularFile | 0o644,
                                 rdev: 0, umask: 0, exclusive: true)
            changerDone.signal()
        }
        XCTAssertTrue(eventually { !callerClient.recalls.isEmpty }, "the other change is waiting on the caller's recall")
        let created = try api.createOpen(caller, parent: directory.ino, name: bytes("mine"), mode: regularFile | 0o644,
                                         umask: 0, flags: O_WRONLY | O_CREAT, writeLease: true)
        _ = try api.unlinkEntry(caller, parent: directory.ino, name: bytes("victim"))
        gate.released.signal()
        XCTAssertEqual(changerDone.wait(timeout: .now() + 30), .success)
        XCTAssertFalse(gate.timedOut, "createOpen and unlinkEntry returned while the recall was still held")
        XCTAssertEqual(try api.lookup(context, parent: directory.ino, name: bytes("mine")).ino, created.attributes.ino)
    }

    func testCreateOpenFailsLikeCreateAndLeavesNothing() throws {
        let (creator, _) = try leasedSession("creator")
        try makeFile("taken")
        XCTAssertErrno(EEXIST, try api.createOpen(creator, parent: root, name: bytes("taken"), mode: regularFile | 0o644,
                                                  umask: 0, flags: O_WRONLY | O_CREAT | O_EXCL, writeLease: true))
        let locked = try api.mkdir(context, parent: root, name: bytes("locked"), mode: 0o755, umask: 0)
        let bobCreator = RequestContext(session: creator.session, credentials: bob)
        XCTAssertErrno(EACCES, try api.createOpen(bobCreator, parent: locked.ino, name: bytes("f"), mode: regularFile | 0o644,
                                                  umask: 0, flags: O_WRONLY | O_CREAT, writeLease: true))
        XCTAssertErrno(ENOENT, try api.lookup(context, parent: locked.ino, name: bytes("f")))
        let file = try makeFile("plain")
        XCTAssertErrno(ENOTDIR, try api.createOpen(creator, parent: file.ino, name: bytes("f"), mode: regularFile | 0o644,
                                                   umask: 0, flags: O_WRONLY | O_CREAT, writeLease: true))
        XCTAssertErrno(ENAMETOOLONG, try api.createOpen(creator, parent: root, name: Array(repeating: 0x61, count: 256),
                                                        mode: regularFile | 0o644, umask: 0, flags: O_WRONLY | O_CREAT,
                                                        writeLease: false))
    }

    func testAReadOverlappingAChangeGetsANoticeBeforeItsReply() throws {
        let file = try makeFile("racing")
        let (holder, client) = try leasedSession()
        _ = try api.getattr(holder, ino: file.ino)
        var during: Attributes?
        // While the change waits for this holder, the holder reads the file again: that reply
        // is from before the change, so it must come with a notice (not to be cached).
        client.onRecall = { [api] ino in during = try? api!.getattr(holder, ino: ino) }
        _ = try api.setattr(context, ino: file.ino, SetAttributes(mode: 0o611))
        XCTAssertEqual(during.map { $0.mode & 0o7777 }, 0o644, "read before the change applied")
        XCTAssertEqual(client.notices.map(\.ino), [file.ino])
    }

    func testAnEndedSessionIsNotRecalled() throws {
        let file = try makeFile("closed")
        let (holder, client) = try leasedSession()
        _ = try api.getattr(holder, ino: file.ino)
        try api.closeSession(holder.session)
        _ = try api.setattr(context, ino: file.ino, SetAttributes(mode: 0o600))
        XCTAssertEqual(client.all, [])
    }

    func testSessionsWithoutLeasesAreNeverRecalledOrNoticed() throws {
        let file = try makeFile("plain")
        let (other, _) = try api.openSession(agentName: "no-leases")
        let otherContext = RequestContext(session: other, credentials: rootCaller)
        _ = try api.getattr(otherContext, ino: file.ino)
        XCTAssertFalse(try api.acquireWriteLease(otherContext, ino: file.ino), "no write lease without leases")
        _ = try api.setattr(context, ino: file.ino, SetAttributes(mode: 0o600))
    }
}

/// In-process only: a holder that cannot be reached, and the test-only switch.
final class HubLeaseTableTests: XCTestCase {
    func testASilentHolderIsWaitedForUntilItsLeasesExpire() throws {
        let table = LeaseTable(logger: testLogger("weft.lease.test"), recallsDisabled: false)
        let client = RecordingLeaseClient()
        client.answers = false
        table.enable(7, client: client)
        XCTAssertTrue(table.grant(7, [42], since: table.readToken()))
        XCTAssertEqual(table.holders(42), [7: .read])
        // Last heard almost a lease period ago: the change waits out the rest, then goes on.
        client.heardNs = Leases.nowNs() - Leases.periodNs + 400_000_000
        let started = Leases.nowNs()
        _ = table.beginChange(1, [.init(42, isFile: true)])
        table.endChange([.init(42, isFile: true)])
        let waitedMs = (Leases.nowNs() - started) / 1_000_000
        XCTAssertGreaterThanOrEqual(waitedMs, 300)
        XCTAssertLessThan(waitedMs, 5_000)
        XCTAssertFalse(client.recalls.isEmpty)
        XCTAssertEqual(table.holders(42), [:], "the silent holder's file lease is void")
    }

    func testTheTestSwitchSkipsRecallsAndNotices() throws {
        let table = LeaseTable(logger: testLogger("weft.lease.test"), recallsDisabled: true)
        let client = RecordingLeaseClient()
        table.enable(7, client: client)
        let token = table.readToken()
        XCTAssertTrue(table.grant(7, [42], since: token))
        _ = table.beginChange(1, [.init(42, isFile: true)])
        XCTAssertTrue(table.grant(7, [42], since: token))
        table.endChange([.init(42, isFile: true)])
        XCTAssertEqual(client.all, [], "nothing is recalled: caches go stale (what the checker must catch)")
        XCTAssertEqual(table.recallCount, 0)
    }

    func testAGrantOvertakenByAChangeIsANoticeNotALease() throws {
        let table = LeaseTable(logger: testLogger("weft.lease.test"), recallsDisabled: false)
        let client = RecordingLeaseClient()
        table.enable(7, client: client)
        let token = table.readToken()
        // A change of 42 began (and even ended) after the read began.
        _ = table.beginChange(1, [.init(42, isFile: true)])
        table.endChange([.init(42, isFile: true)])
        XCTAssertTrue(table.grant(7, [42, 43], since: token))
        XCTAssertEqual(client.notices.map(\.ino), [42])
        XCTAssertEqual(table.holders(42), [:])
        XCTAssertEqual(table.holders(43), [7: .read])
    }

    /// A read that began while a change was under way may have seen the inode before the change
    /// applied; when the change ends before the grant, the grant must still be a notice (found by
    /// the two-hub linearizability test, seed 3044: a far agent cached a layout read during a
    /// near agent's write and served the old block from it after the write had returned).
    func testAReadThatBeganDuringAChangeThatEndedSinceIsANoticeNotALease() throws {
        let table = LeaseTable(logger: testLogger("weft.lease.test"), recallsDisabled: false)
        let client = RecordingLeaseClient()
        table.enable(7, client: client)
        table.enable(1, client: RecordingLeaseClient())
        _ = table.beginChange(1, [.init(42, isFile: true)])
        let token = table.readToken()   // the read begins with the change under way
        table.endChange([.init(42, isFile: true)])
        XCTAssertTrue(table.grant(7, [42, 43], since: token))
        XCTAssertEqual(client.notices.map(\.ino), [42])
        XCTAssertEqual(table.holders(42), [:])
        XCTAssertEqual(table.holders(43), [7: .read])
    }

    /// The changer's own reply is granted before its change ends: its own change and its end
    /// are no reason for a notice, another session's change that ended meanwhile is.
    func testAChangersReplyIsLeasedUnlessAnotherChangeOvertookIt() throws {
        let table = LeaseTable(logger: testLogger("weft.lease.test"), recallsDisabled: false)
        let changer = RecordingLeaseClient(), other = RecordingLeaseClient()
        table.enable(1, client: changer)
        table.enable(2, client: other)
        let own = [LeaseTable.Target(42, isFile: true)]
        var token = table.beginChange(1, own)
        XCTAssertTrue(table.grant(1, [42], since: token, ownChange: own))
        table.endChange(own)
        XCTAssertEqual(changer.notices.map(\.ino), [])
        XCTAssertEqual(table.holders(42), [1: .read])

        _ = table.beginChange(2, [.init(43, isFile: true)])   // under way before the changer's
        token = table.beginChange(1, [.init(43, isFile: true)])
        table.endChange([.init(43, isFile: true)])           // the other change ends first
        XCTAssertTrue(table.grant(1, [43], since: token, ownChange: [.init(43, isFile: true)]))
        table.endChange([.init(43, isFile: true)])
        XCTAssertEqual(changer.notices.map(\.ino), [43])
        XCTAssertEqual(table.holders(43), [:])
    }

    /// A holder handles a recall, reads the file again at once, and that read reaches the home
    /// before the recall's answer: the newer lease must outlive the recall, or the holder
    /// caches what the next change will not recall (a stale read the checker caught).
    func testALeaseTakenAgainDuringItsRecallOutlivesTheRecall() throws {
        let table = LeaseTable(logger: testLogger("weft.lease.test"), recallsDisabled: false)
        let reader = RecordingLeaseClient()
        table.enable(1, client: reader)
        table.enable(2, client: RecordingLeaseClient())
        XCTAssertTrue(table.grant(1, [42], since: table.readToken()))
        var rereads = 0
        reader.onRecall = { ino in
            guard rereads == 0 else { return }
            rereads += 1
            XCTAssertTrue(table.grant(1, [ino], since: table.readToken()))
        }
        XCTAssertTrue(table.acquireWrite(2, 42))
        XCTAssertEqual(reader.recalls.count, 2, "the lease taken during the first recall is recalled before the write lease")
        XCTAssertEqual(table.holders(42), [2: .write])

        // A writer recalled by a reader, committing inside the recall (its own commit's reply is
        // granted to it): it keeps a read lease, no longer the write lease it stopped using.
        let writer = RecordingLeaseClient()
        table.enable(3, client: writer)
        XCTAssertTrue(table.acquireWrite(3, 43))
        writer.onRecall = { ino in XCTAssertTrue(table.grant(3, [ino], since: table.readToken())) }
        XCTAssertFalse(table.grant(1, [43], since: table.readToken()), "the reader recalls the writer first")
        XCTAssertEqual(table.holders(43), [3: .read], "the writer's lease taken during the recall outlives it")
        XCTAssertTrue(table.grant(1, [43], since: table.readToken()))
        XCTAssertEqual(table.holders(43), [1: .read, 3: .read])
        XCTAssertEqual(writer.recalls.count, 1)

        // A holder that takes a new lease during every recall: the write lease is refused after
        // a bounded number of rounds (the opener writes through), and its lease stands.
        reader.reset()
        reader.onRecall = { ino in XCTAssertTrue(table.grant(1, [ino], since: table.readToken())) }
        XCTAssertFalse(table.acquireWrite(2, 43))
        XCTAssertEqual(reader.recalls.count, LeaseTable.acquireRoundsMax)
        XCTAssertEqual(table.holders(43)[1], .read)
        XCTAssertNil(table.holders(43)[2])
    }
}

extension HubLeaseTableTests {
    /// A session past its bound has its oldest read leases on regular files recalled, in the
    /// background, down to 7/8 of the bound; directories and write leases stay.
    func testASessionBeyondItsBoundShedsItsOldestFileLeases() throws {
        let table = LeaseTable(logger: testLogger("weft.lease.test"), recallsDisabled: false, maxLeasesPerSession: 64)
        table.isRegularFile = { $0 >= 1000 }  // below 1000: directories
        let client = RecordingLeaseClient()
        table.enable(7, client: client)
        let other = RecordingLeaseClient()
        table.enable(8, client: other)
        XCTAssertTrue(table.grant(7, Array(1..<17), since: table.readToken()))
        XCTAssertTrue(table.acquireWrite(7, 5000))
        XCTAssertTrue(table.grant(8, [1000, 1001], since: table.readToken()))
        for ino in 1000..<1200 as Range<InodeID> { XCTAssertTrue(table.grant(7, [ino], since: table.readToken())) }
        // Sheds that ran while those grants came may have ended anywhere up to the bound (a
        // grant below it starts none): once they are done, grants that pass the bound with no
        // other grant coming start the shed this test watches.
        let deadline = Date().addingTimeInterval(10)
        func waitForSheds(_ done: () -> Bool) {
            while !(done() && table.shedLeaseCount == UInt64(client.recalls.count)) && Date() < deadline { usleep(1000) }
            usleep(20_000)
        }
        waitForSheds { table.leaseCount(7) <= 64 }
        let past = 65 - table.leaseCount(7)
        XCTAssertGreaterThan(past, 0)
        XCTAssertTrue(table.grant(7, (0..<past).map { 1200 + InodeID($0) }, since: table.readToken()))
        // Until 7/8 of the bound is reached and every lease counted as shed has had its recall.
        waitForSheds { table.leaseCount(7) <= 56 }
        XCTAssertLessThanOrEqual(table.leaseCount(7), 56)
        XCTAssertGreaterThanOrEqual(table.leaseCount(7), 16 + 1, "the directories and the write lease stay")

        let recalled = client.recalls.map(\.ino)
        XCTAssertEqual(Set(recalled).count, recalled.count, "each lease recalled once")
        XCTAssertEqual(table.shedLeaseCount, UInt64(recalled.count))
        XCTAssertTrue(Set(recalled).isSubset(of: Set(1000..<1300 as Range<InodeID>)), "only read leases on files")
        for directory in 1..<17 as Range<InodeID> { XCTAssertEqual(table.holders(directory), [7: .read]) }
        XCTAssertEqual(table.holders(5000), [7: .write])
        XCTAssertEqual(table.holders(1200 + InodeID(past) - 1), [7: .read], "the newest stay")
        XCTAssertEqual(table.holders(1000), [8: .read], "the oldest went; another session's lease did not")
        XCTAssertEqual(other.recalls, [], "nothing of another session is shed")
        XCTAssertEqual(table.leaseCount(8), 2)
        // A shed lease is taken again by the next read; a change recalls only current holders.
        XCTAssertTrue(table.grant(7, [1000], since: table.readToken()))
        XCTAssertEqual(table.holders(1000), [7: .read, 8: .read])
        client.reset()
        _ = table.beginChange(9, [.init(1001, isFile: true)])
        table.endChange([.init(1001, isFile: true)])
        XCTAssertEqual(client.recalls, [], "the shed lease on 1001 is not recalled again")
        XCTAssertEqual(other.recalls.map(\.ino), [1001])
    }
}

/// Counts calls from the shedding thread.
private final class LookupCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    func add() { lock.withLock { count += 1 } }
    var value: Int { lock.withLock { count } }
}

extension HubLeaseTableTests {
    /// Past the bound with directory leases only: nothing is recalled, and after a pass that
    /// found nothing to shed the table looks again only once another 1/8 of the bound came.
    func testDirectoryLeasesPastTheBoundAreKeptAndNotScannedOnEveryGrant() throws {
        let table = LeaseTable(logger: testLogger("weft.lease.test"), recallsDisabled: false, maxLeasesPerSession: 64)
        let looked = LookupCounter()
        table.isRegularFile = { _ in looked.add(); return false }
        let client = RecordingLeaseClient()
        table.enable(7, client: client)
        /// Waits until no pass has looked at anything for 100 ms; returns how many lookups so far.
        func settled() -> Int {
            var last = -1
            let deadline = Date().addingTimeInterval(5)
            while Date() < deadline {
                let now = looked.value
                if now == last { return now }
                last = now
                usleep(100_000)
            }
            return looked.value
        }
        // One grant of 100 (one hold of the table's lock): the pass it starts sees all of them.
        XCTAssertTrue(table.grant(7, Array(1...100), since: table.readToken()))
        let first = settled()
        XCTAssertGreaterThan(first, 0, "a pass looked")
        XCTAssertEqual(client.recalls, [], "no directory lease is recalled")
        XCTAssertEqual(table.leaseCount(7), 100)
        XCTAssertEqual(table.shedLeaseCount, 0)
        XCTAssertTrue(table.grant(7, [101], since: table.readToken()))
        XCTAssertEqual(settled(), first, "one more grant does not start another pass")
        XCTAssertTrue(table.grant(7, Array(102...130), since: table.readToken()))
        XCTAssertGreaterThan(settled(), first, "another 1/8 of the bound later, a pass looks again")
        XCTAssertEqual(client.recalls, [])
        XCTAssertEqual(table.leaseCount(7), 130)
    }
}

/// The grace period after a crash, and reclaiming write leases (SPEC.md §12.6).
final class HubLeaseGraceTests: HubTestCase {
    func testACrashWhileRemoteAgentsHeldLeasesLeavesAGracePeriodAndACleanCloseDoesNot() throws {
        let fixture = try makeHub()
        let marker = fixture.directory + "/leases.active"
        let (session, _) = try fixture.hub.openSession(agentName: "remote")
        // An agent inside the hub's process does not outlive it: no marker for it.
        final class InProcess: LeaseClient, @unchecked Sendable {
            func recall(_ ino: InodeID, names: [[UInt8]], notice: Bool, deadlineNs: UInt64) -> Bool { true }
            var lastHeardNs: UInt64 { Leases.nowNs() }
            func leasesLost() {}
            var survivesHubRestart: Bool { false }
        }
        try fixture.hub.enableLeases(session, client: InProcess())
        XCTAssertFalse(FileManager.default.fileExists(atPath: marker))
        try fixture.hub.enableLeases(session, client: RecordingLeaseClient())
        XCTAssertTrue(FileManager.default.fileExists(atPath: marker), "remote lease holders are recorded durably")

        try fixture.restart()
        XCTAssertFalse(fixture.hub.leases.inGrace, "a clean close ends every lease: no grace")
        XCTAssertFalse(FileManager.default.fileExists(atPath: marker))

        // What a kill -9 leaves behind: the marker.
        try fixture.restart { _ = FileManager.default.createFile(atPath: marker, contents: nil) }
        XCTAssertTrue(fixture.hub.leases.inGrace)
        // During the grace period a returning writer takes its write lease back at once.
        let (writer, _) = try fixture.hub.openSession(agentName: "writer")
        try fixture.hub.enableLeases(writer, client: RecordingLeaseClient())
        let file = try fixture.hub.meta.create(.root, parent: InodeNumbers.root, name: bytes("f"), mode: regularFile | 0o644,
                                               rdev: 0, umask: 0, exclusive: true)
        let context = RequestContext(session: writer, credentials: .root)
        let started = Leases.nowNs()
        XCTAssertTrue(try fixture.hub.reclaimWriteLease(context, ino: file.ino))
        XCTAssertLessThan(Leases.nowNs() - started, 1_000_000_000, "reclaims are served during the grace period")
        XCTAssertEqual(fixture.hub.leases.holders(file.ino), [writer: .write])
    }

    func testAReclaimIsRefusedWhenAnotherSessionHoldsALease() throws {
        let table = LeaseTable(logger: testLogger("weft.lease.test"), recallsDisabled: false)
        table.enable(1, client: RecordingLeaseClient())
        table.enable(2, client: RecordingLeaseClient())
        XCTAssertTrue(table.grant(2, [42], since: table.readToken()))
        XCTAssertFalse(table.reclaimWrite(1, 42), "someone else read it since: the writer's buffered data goes through")
        XCTAssertTrue(table.reclaimWrite(1, 43))
        XCTAssertFalse(table.reclaimWrite(9, 44), "a session without leases reclaims nothing")
    }

    func testTheGracePeriodHoldsReadsUntilItEnds() throws {
        let table = LeaseTable(logger: testLogger("weft.lease.test"), recallsDisabled: false)
        table.startGrace(300_000_000)
        let started = Leases.nowNs()
        table.waitForGrace()
        XCTAssertGreaterThanOrEqual(Leases.nowNs() - started, 250_000_000)
        XCTAssertFalse(table.inGrace)
    }
}
