#if canImport(Glibc)
import Glibc
#endif
import WeftTestSupport
import XCTest
import WeftProto
@testable import WeftMeta

/// open (permissions, O_TRUNC), sessions, and unlinked-but-open files (orphans).
final class OpenFileTests: MetaStoreTestCase {
    /// A file of `chunks` full chunks; returns it and the slice ids it references.
    private func fileWithData(_ name: String, chunks: UInt32 = 2) throws -> (Attributes, [SliceID]) {
        let file = try makeFile(name, mode: 0o666)
        var commits: [SliceCommit] = []
        for index in 0..<chunks { commits.append(try slice(index, offset: 0, length: Self.chunkSizeBytes)) }
        let attributes = try store.commitSlices(ino: file.ino, slices: commits,
                                                minimumSize: UInt64(chunks) * UInt64(Self.chunkSizeBytes), durable: true)
        return (attributes, commits.map(\.slice.id))
    }

    func testOpenChecksPermissions() throws {
        let session = store.openSession(agentName: "t")
        let file = try makeFile("f", mode: 0o640)
        try chown(file.ino, to: Callers.alice)
        let groupMember = Credentials(uid: 50, gid: Callers.alice.gid)
        XCTAssertEqual(try store.open(Callers.alice, session: session, ino: file.ino, flags: O_RDWR).ino, file.ino)
        XCTAssertErrno(EACCES, try store.open(Callers.bob, session: session, ino: file.ino, flags: O_RDONLY))
        XCTAssertNoThrow(try store.open(groupMember, session: session, ino: file.ino, flags: O_RDONLY))
        XCTAssertErrno(EACCES, try store.open(groupMember, session: session, ino: file.ino, flags: O_WRONLY))
        XCTAssertErrno(EACCES, try store.open(groupMember, session: session, ino: file.ino, flags: O_RDONLY | O_TRUNC))
        XCTAssertNoThrow(try store.open(Callers.root, session: session, ino: file.ino, flags: O_RDWR))
        XCTAssertErrno(EISDIR, try store.open(Callers.root, session: session, ino: root, flags: O_WRONLY))
        XCTAssertErrno(EISDIR, try store.open(Callers.root, session: session, ino: root, flags: O_RDWR))
        XCTAssertTrue(try store.open(Callers.root, session: session, ino: root, flags: O_RDONLY).isDirectory)
        let link = try store.symlink(Callers.root, parent: root, name: bytes("l"), target: bytes("f"))
        XCTAssertErrno(ELOOP, try store.open(Callers.root, session: session, ino: link.ino, flags: O_RDONLY))
        XCTAssertErrno(ENOENT, try store.open(Callers.root, session: session, ino: 9191, flags: O_RDONLY))
    }

    func testOpenWithTruncate() throws {
        let session = store.openSession(agentName: "t")
        let (file, ids) = try fileWithData("f")
        XCTAssertEqual(store.currentCounters.logicalBytes, 2 * UInt64(Self.chunkSizeBytes))
        XCTAssertEqual(try store.takeGarbage(limit: 10), [])
        // Without write permission O_TRUNC fails and changes nothing.
        try chmod(file.ino, 0o644)
        XCTAssertErrno(EACCES, try store.open(Callers.bob, session: session, ino: file.ino, flags: O_RDONLY | O_TRUNC))
        XCTAssertEqual(try store.getattr(file.ino).size, file.size)
        try chmod(file.ino, 0o666)
        let opened = try store.open(Callers.bob, session: session, ino: file.ino, flags: O_WRONLY | O_TRUNC)
        XCTAssertEqual(opened.size, 0)
        XCTAssertGreaterThan(opened.dataVersion, file.dataVersion)
        XCTAssertEqual(try store.getattr(file.ino).size, 0)
        XCTAssertEqual(try store.layout(ino: file.ino, firstChunk: 0, count: 4).1, [[], [], [], []])
        XCTAssertEqual(Set(try store.takeGarbage(limit: 10)), Set(ids), "the truncated data is garbage")
        XCTAssertEqual(store.currentCounters.logicalBytes, 0)
        // Truncating an empty file changes nothing.
        let again = try store.open(Callers.bob, session: session, ino: file.ino, flags: O_WRONLY | O_TRUNC)
        XCTAssertEqual(again.dataVersion, opened.dataVersion)
        try assertConsistent()
    }

    func testUnlinkWhileOpenKeepsTheInodeUntilRelease() throws {
        let session = store.openSession(agentName: "t")
        let (file, ids) = try fileWithData("f")
        _ = try store.open(Callers.root, session: session, ino: file.ino, flags: O_RDWR)
        _ = try store.open(Callers.root, session: session, ino: file.ino, flags: O_RDONLY)
        try store.unlink(Callers.root, parent: root, name: bytes("f"))
        XCTAssertErrno(ENOENT, try lookup("f"))
        let orphan = try store.getattr(file.ino)
        XCTAssertEqual(orphan.nlink, 0)
        XCTAssertEqual(orphan.size, file.size)
        XCTAssertEqual(try store.layout(ino: file.ino, firstChunk: 0, count: 2).1.map(\.count), [1, 1],
                       "the data stays readable")
        XCTAssertEqual(try store.takeGarbage(limit: 10), [])
        XCTAssertEqual(store.currentCounters.inodes, 2)
        try assertConsistent()
        // Writes to an open orphan still commit.
        let more = try slice(2, offset: 0, length: 100)
        XCTAssertEqual(try store.commitSlices(ino: file.ino, slices: [more], minimumSize: file.size + 100,
                                              durable: true).size, file.size + 100)
        try store.release(session: session, ino: file.ino)
        XCTAssertEqual(try store.getattr(file.ino).nlink, 0, "one handle is still open")
        try store.release(session: session, ino: file.ino)
        XCTAssertErrno(ENOENT, try store.getattr(file.ino), "reclaimed at the last release")
        XCTAssertEqual(Set(try store.takeGarbage(limit: 10)), Set(ids + [more.slice.id]))
        XCTAssertEqual(store.currentCounters.inodes, 1)
        XCTAssertEqual(store.currentCounters.logicalBytes, 0)
        try assertConsistent()
    }

    func testCreateOpenOpensTheNewFileInTheSameTransaction() throws {
        let session = store.openSession(agentName: "t")
        let sticky = try store.mkdir(Callers.root, parent: root, name: bytes("d"), mode: 0o1777, umask: 0)
        let before = try store.getattr(sticky.ino)
        // A file created without any permission bits is still open for its creator, and the
        // directory's attributes come back as the change left them.
        let created = try store.createOpen(Callers.alice, session: session, parent: sticky.ino, name: bytes("f"),
                                           mode: UInt32(S_IFREG), umask: 0o022)
        XCTAssertEqual(created.file.mode, UInt32(S_IFREG))
        XCTAssertEqual(created.file.uid, Callers.alice.uid)
        XCTAssertEqual(created.parent, try store.getattr(sticky.ino))
        XCTAssertNotEqual(created.parent.ctimeNs, 0)
        XCTAssertGreaterThanOrEqual(created.parent.mtimeNs, before.mtimeNs)
        // The open counts: the unlinked file stays until its release.
        try store.unlink(Callers.alice, parent: sticky.ino, name: bytes("f"))
        XCTAssertEqual(try store.getattr(created.file.ino).nlink, 0)
        try assertConsistent()
        try store.release(session: session, ino: created.file.ino)
        XCTAssertErrno(ENOENT, try store.getattr(created.file.ino), "reclaimed at the release of the create's open")

        // A failed create opens nothing: the existing file is not held by it.
        let existing = try makeFile("taken")
        XCTAssertErrno(EEXIST, try store.createOpen(Callers.root, session: session, parent: root, name: bytes("taken"),
                                                    mode: UInt32(S_IFREG) | 0o644, umask: 0))
        XCTAssertErrno(EACCES, try store.createOpen(Callers.bob, session: session, parent: root, name: bytes("g"),
                                                    mode: UInt32(S_IFREG) | 0o644, umask: 0))
        try store.unlink(Callers.root, parent: root, name: bytes("taken"))
        XCTAssertErrno(ENOENT, try store.getattr(existing.ino), "no open was left behind by the failed creates")
        XCTAssertEqual(store.currentCounters.inodes, 2)
        try assertConsistent()
    }

    func testReleaseOfANamedFileKeepsIt() throws {
        let session = store.openSession(agentName: "t")
        let file = try makeFile("f")
        _ = try store.open(Callers.root, session: session, ino: file.ino, flags: O_RDONLY)
        try store.release(session: session, ino: file.ino)
        try store.release(session: session, ino: file.ino)   // one release too many is ignored
        try store.release(session: 999, ino: file.ino)        // as is an unknown session
        XCTAssertEqual(try store.getattr(file.ino).nlink, 1)
    }

    func testReplacingAnOpenFileByRenameKeepsItUntilRelease() throws {
        let session = store.openSession(agentName: "t")
        let (victim, ids) = try fileWithData("victim", chunks: 1)
        try makeFile("new")
        _ = try store.open(Callers.root, session: session, ino: victim.ino, flags: O_RDONLY)
        try store.rename(Callers.root, parent: root, name: bytes("new"), newParent: root, newName: bytes("victim"),
                         flags: [])
        XCTAssertEqual(try store.getattr(victim.ino).nlink, 0)
        try assertConsistent()
        try store.release(session: session, ino: victim.ino)
        XCTAssertErrno(ENOENT, try store.getattr(victim.ino))
        XCTAssertEqual(try store.takeGarbage(limit: 10), ids)
    }

    func testSessions() throws {
        let first = store.openSession(agentName: "node-a")
        let second = store.openSession(agentName: "node-b")
        XCTAssertNotEqual(first, second)
        XCTAssertEqual(store.agentNames, ["node-a", "node-b"])
        try store.closeSession(first)
        XCTAssertEqual(store.agentNames, ["node-b"])
        try store.closeSession(first)   // closing twice is harmless
        try store.closeSession(second)
        XCTAssertEqual(store.agentNames, [])
    }

    func testCloseSessionReleasesItsOpenFiles() throws {
        let first = store.openSession(agentName: "a")
        let second = store.openSession(agentName: "b")
        let (shared, _) = try fileWithData("shared", chunks: 1)
        let (own, _) = try fileWithData("own", chunks: 1)
        for _ in 0..<3 { _ = try store.open(Callers.root, session: first, ino: shared.ino, flags: O_RDONLY) }
        _ = try store.open(Callers.root, session: second, ino: shared.ino, flags: O_RDONLY)
        _ = try store.open(Callers.root, session: first, ino: own.ino, flags: O_RDONLY)
        try store.unlink(Callers.root, parent: root, name: bytes("shared"))
        try store.unlink(Callers.root, parent: root, name: bytes("own"))
        try store.closeSession(first)
        XCTAssertErrno(ENOENT, try store.getattr(own.ino))
        XCTAssertEqual(try store.getattr(shared.ino).nlink, 0, "the other session still holds it")
        try store.closeSession(second)
        XCTAssertErrno(ENOENT, try store.getattr(shared.ino))
        XCTAssertEqual(store.currentCounters.inodes, 1)
        try assertConsistent()
    }

    func testOrphansSurviveReopenAndAreReclaimed() throws {
        let session = store.openSession(agentName: "t")
        let (file, ids) = try fileWithData("f")
        let (kept, _) = try fileWithData("kept", chunks: 1)
        _ = try store.open(Callers.root, session: session, ino: file.ino, flags: O_RDWR)
        _ = try store.open(Callers.root, session: session, ino: kept.ino, flags: O_RDWR)
        try store.unlink(Callers.root, parent: root, name: bytes("f"))
        // The process ends without releasing: the orphan is on disk.
        try reopen()
        XCTAssertEqual(try store.getattr(file.ino).nlink, 0)
        try assertConsistent()
        XCTAssertEqual(try store.reclaimOrphans(), 1)
        XCTAssertErrno(ENOENT, try store.getattr(file.ino))
        XCTAssertEqual(try store.getattr(kept.ino).nlink, 1, "named files are no orphans")
        XCTAssertEqual(Set(try store.takeGarbage(limit: 10)), Set(ids))
        XCTAssertEqual(try store.reclaimOrphans(), 0)
        XCTAssertEqual(store.currentCounters.inodes, 2)
        try assertConsistent()
    }
}
