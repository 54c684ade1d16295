#if canImport(Glibc)
import Glibc
#endif
import WeftTestSupport
import XCTest
import WeftProto
@testable import WeftMeta

/// setattr (chmod, chown, utimens, truncate) and the sticky and setgid directory rules.
final class PermissionTests: MetaStoreTestCase {
    /// A file owned by alice:alice with `mode`.
    private func aliceFile(_ name: String = "f", mode: UInt32 = 0o644) throws -> Attributes {
        let file = try makeFile(name, mode: mode)
        try chown(file.ino, to: Callers.alice)
        return try store.getattr(file.ino)
    }

    // MARK: chmod

    func testChmodByOwnerKeepsTheFileType() throws {
        let file = try aliceFile()
        let changed = try store.setattr(Callers.alice, ino: file.ino, SetAttributes(mode: 0o600))
        XCTAssertEqual(changed.mode, FileType.regular | 0o600)
        XCTAssertEqual(try store.setattr(Callers.alice, ino: file.ino,
                                         SetAttributes(mode: FileType.directory | 0o640)).mode,
                       FileType.regular | 0o640, "type bits in the request are ignored")
        XCTAssertGreaterThanOrEqual(changed.ctimeNs, file.ctimeNs)
        XCTAssertEqual(try store.getattr(file.ino).mode, FileType.regular | 0o640)
    }

    func testChmodByNonOwnerIsEPERM() throws {
        let file = try aliceFile(mode: 0o666)
        XCTAssertErrno(EPERM, try store.setattr(Callers.bob, ino: file.ino, SetAttributes(mode: 0o777)))
        XCTAssertEqual(try store.getattr(file.ino).mode, FileType.regular | 0o666)
        XCTAssertEqual(try store.setattr(Callers.root, ino: file.ino, SetAttributes(mode: 0o4755)).mode,
                       FileType.regular | 0o4755, "root may")
    }

    func testChmodClearsSetGIDWhenNotInTheGroup() throws {
        let file = try makeFile("f")
        _ = try store.setattr(Callers.root, ino: file.ino, SetAttributes(uid: Callers.alice.uid, gid: 2000))
        XCTAssertEqual(try store.setattr(Callers.alice, ino: file.ino, SetAttributes(mode: 0o2755)).mode,
                       FileType.regular | 0o755, "alice is not in group 2000")
        let member = Credentials(uid: Callers.alice.uid, gid: Callers.alice.gid, groups: [2000])
        XCTAssertEqual(try store.setattr(member, ino: file.ino, SetAttributes(mode: 0o2755)).mode,
                       FileType.regular | 0o2755, "a supplementary group counts")
        XCTAssertEqual(try store.setattr(Callers.alice, ino: file.ino, SetAttributes(mode: 0o4755)).mode,
                       FileType.regular | 0o4755, "setuid is the owner's to set")
    }

    // MARK: chown

    func testChownRules() throws {
        let file = try aliceFile()
        let member = Credentials(uid: Callers.alice.uid, gid: Callers.alice.gid, groups: [3000])
        // Only root gives a file away.
        XCTAssertErrno(EPERM, try store.setattr(Callers.alice, ino: file.ino, SetAttributes(uid: Callers.bob.uid)))
        XCTAssertErrno(EPERM, try store.setattr(Callers.bob, ino: file.ino, SetAttributes(uid: Callers.bob.uid)))
        // The owner may change the group to one of hers, not to another.
        XCTAssertErrno(EPERM, try store.setattr(Callers.alice, ino: file.ino, SetAttributes(gid: 3000)))
        XCTAssertEqual(try store.setattr(member, ino: file.ino, SetAttributes(gid: 3000)).gid, 3000)
        XCTAssertErrno(EPERM, try store.setattr(Callers.bob, ino: file.ino, SetAttributes(gid: Callers.bob.gid)),
                       "a non-owner may not change the group, even to his own")
        // A no-op chown by the owner is allowed.
        XCTAssertEqual(try store.setattr(member, ino: file.ino, SetAttributes(uid: Callers.alice.uid, gid: 3000)).uid,
                       Callers.alice.uid)
        let given = try store.setattr(Callers.root, ino: file.ino, SetAttributes(uid: Callers.bob.uid, gid: Callers.bob.gid))
        XCTAssertEqual(given.uid, Callers.bob.uid)
        XCTAssertEqual(given.gid, Callers.bob.gid)
    }

    func testChownClearsSetUIDAndSetGID() throws {
        let file = try aliceFile(mode: 0o755)
        _ = try store.setattr(Callers.root, ino: file.ino, SetAttributes(mode: 0o6755))
        XCTAssertEqual(try store.getattr(file.ino).mode & 0o7777, 0o6755)
        let member = Credentials(uid: Callers.alice.uid, gid: Callers.alice.gid, groups: [3000])
        let changed = try store.setattr(member, ino: file.ino, SetAttributes(gid: 3000))
        XCTAssertEqual(changed.mode & 0o7777, 0o0755, "setuid and (group-executable) setgid are cleared")
        _ = try store.setattr(Callers.root, ino: file.ino, SetAttributes(mode: 0o6745))
        let byRoot = try store.setattr(Callers.root, ino: file.ino, SetAttributes(uid: Callers.bob.uid))
        XCTAssertEqual(byRoot.mode & 0o7777, 0o2745, "setgid without group execute marks locking and stays")
        let directory = try makeDirectory("d", mode: 0o2755)
        try chown(directory.ino, to: Callers.alice)
        XCTAssertEqual(try store.getattr(directory.ino).mode & 0o7777, 0o2755, "directories keep setgid")
    }

    // MARK: times

    func testExplicitTimesNeedOwnership() throws {
        let file = try aliceFile(mode: 0o666)
        let when: Int64 = 1_234_567_890_123_456_789
        XCTAssertErrno(EPERM, try store.setattr(Callers.bob, ino: file.ino, SetAttributes(mtime: .nanoseconds(when))))
        XCTAssertErrno(EPERM, try store.setattr(Callers.bob, ino: file.ino, SetAttributes(atime: .nanoseconds(when))))
        let set = try store.setattr(Callers.alice, ino: file.ino,
                                    SetAttributes(atime: .nanoseconds(when), mtime: .nanoseconds(when + 1)))
        XCTAssertEqual(set.atimeNs, when)
        XCTAssertEqual(set.mtimeNs, when + 1)
        XCTAssertGreaterThan(set.ctimeNs, when + 1, "ctime is the hub's clock")
        XCTAssertEqual(try store.setattr(Callers.root, ino: file.ino, SetAttributes(mtime: .nanoseconds(-5))).mtimeNs, -5)
    }

    func testTimesNowNeedWriteAccessOrOwnership() throws {
        let file = try aliceFile(mode: 0o666)
        let before = currentTimeNs()
        let touched = try store.setattr(Callers.bob, ino: file.ino, SetAttributes(atime: .now, mtime: .now))
        XCTAssertGreaterThanOrEqual(touched.mtimeNs, before)
        XCTAssertGreaterThanOrEqual(touched.atimeNs, before)
        _ = try store.setattr(Callers.alice, ino: file.ino, SetAttributes(mode: 0o644))
        XCTAssertErrno(EACCES, try store.setattr(Callers.bob, ino: file.ino, SetAttributes(mtime: .now)))
        XCTAssertNoThrow(try store.setattr(Callers.bob, ino: file.ino, SetAttributes(mtime: .now, byHandle: true)),
                         "through an open handle write access was checked at open")
        _ = try store.setattr(Callers.alice, ino: file.ino, SetAttributes(mode: 0o444))
        XCTAssertNoThrow(try store.setattr(Callers.alice, ino: file.ino, SetAttributes(mtime: .now)),
                         "the owner may touch a file without write permission")
    }

    // MARK: truncate through setattr

    func testSizeChangeRules() throws {
        let file = try aliceFile(mode: 0o644)
        XCTAssertEqual(try store.setattr(Callers.alice, ino: file.ino, SetAttributes(size: 4096)).size, 4096)
        XCTAssertErrno(EACCES, try store.setattr(Callers.bob, ino: file.ino, SetAttributes(size: 0)))
        XCTAssertEqual(try store.setattr(Callers.bob, ino: file.ino, SetAttributes(size: 10, byHandle: true)).size, 10)
        XCTAssertErrno(EISDIR, try store.setattr(Callers.root, ino: root, SetAttributes(size: 0)))
        let link = try store.symlink(Callers.root, parent: root, name: bytes("l"), target: bytes("t"))
        XCTAssertErrno(EINVAL, try store.setattr(Callers.root, ino: link.ino, SetAttributes(size: 0)))
        XCTAssertErrno(EFBIG, try store.setattr(Callers.root, ino: file.ino,
                                                SetAttributes(size: Limits.fileSizeMaxBytes + 1)))
        XCTAssertErrno(ENOENT, try store.setattr(Callers.root, ino: 5555, SetAttributes(mode: 0o600)))
        XCTAssertEqual(try store.getattr(file.ino).size, 10, "failed changes leave the file alone")
    }

    func testFailedSetattrChangesNothing() throws {
        let file = try aliceFile(mode: 0o644)
        XCTAssertErrno(EACCES, try store.setattr(Callers.bob, ino: file.ino, SetAttributes(size: 0, mtime: .now)))
        XCTAssertErrno(EPERM, try store.setattr(Callers.alice, ino: file.ino,
                                                SetAttributes(mode: 0o600, uid: Callers.bob.uid)))
        XCTAssertEqual(try store.getattr(file.ino), file)
    }

    // MARK: sticky directories

    func testStickyDirectoryProtectsOthersEntries() throws {
        let shared = try makeDirectory("tmp", mode: 0o1777)
        let carol = Credentials(uid: 1002, gid: 1002)
        try chown(shared.ino, to: carol)
        try makeFile("alices", in: shared.ino, as: Callers.alice)
        try makeDirectory("alicedir", in: shared.ino, as: Callers.alice)
        XCTAssertErrno(EPERM, try store.unlink(Callers.bob, parent: shared.ino, name: bytes("alices")))
        XCTAssertErrno(EPERM, try store.rmdir(Callers.bob, parent: shared.ino, name: bytes("alicedir")))
        XCTAssertErrno(EPERM, try store.rename(Callers.bob, parent: shared.ino, name: bytes("alices"), newParent: shared.ino,
                                               newName: bytes("bobs"), flags: []))
        // Nor may bob replace alice's entry with his own.
        try makeFile("bobs", in: shared.ino, as: Callers.bob)
        XCTAssertErrno(EPERM, try store.rename(Callers.bob, parent: shared.ino, name: bytes("bobs"), newParent: shared.ino,
                                               newName: bytes("alices"), flags: []))
        // The entry's owner, the directory's owner and root may.
        try store.rename(Callers.alice, parent: shared.ino, name: bytes("alices"), newParent: shared.ino,
                         newName: bytes("alices2"), flags: [])
        try store.unlink(carol, parent: shared.ino, name: bytes("alices2"))
        try store.rmdir(Callers.root, parent: shared.ino, name: bytes("alicedir"))
        try store.unlink(Callers.bob, parent: shared.ino, name: bytes("bobs"))
        XCTAssertEqual(try names(in: shared.ino), [])
        try assertConsistent()
    }

    // MARK: setgid directories

    func testSetGIDDirectoryInheritance() throws {
        let shared = try makeDirectory("project", mode: 0o2777)
        _ = try store.setattr(Callers.root, ino: shared.ino, SetAttributes(gid: 500))
        XCTAssertEqual(try store.getattr(shared.ino).mode & 0o7777, 0o2777)
        let file = try makeFile("file", in: shared.ino, mode: 0o664, as: Callers.alice)
        XCTAssertEqual(file.gid, 500, "new files take the directory's group")
        XCTAssertEqual(file.uid, Callers.alice.uid)
        let directory = try makeDirectory("sub", in: shared.ino, mode: 0o755, as: Callers.alice)
        XCTAssertEqual(directory.gid, 500)
        XCTAssertEqual(directory.mode & 0o7777, 0o2755, "new directories inherit setgid")
        let deeper = try makeDirectory("deeper", in: directory.ino, as: Callers.alice)
        XCTAssertEqual(deeper.gid, 500)
        XCTAssertNotEqual(deeper.mode & FileType.setGID, 0)
        // A setgid file in the directory keeps setgid only for a member of the group.
        let setgid = try makeFile("sgid", in: shared.ino, mode: 0o2755, as: Callers.alice)
        XCTAssertEqual(setgid.mode & 0o7777, 0o0755)
        let member = Credentials(uid: Callers.alice.uid, gid: Callers.alice.gid, groups: [500])
        XCTAssertEqual(try makeFile("sgid2", in: shared.ino, mode: 0o2755, as: member).mode & 0o7777, 0o2755)
        // Without setgid on the directory the creator's group applies.
        let plain = try makeDirectory("plain", mode: 0o777)
        XCTAssertEqual(try makeFile("f", in: plain.ino, as: Callers.alice).gid, Callers.alice.gid)
        let symlink = try store.symlink(Callers.alice, parent: shared.ino, name: bytes("l"), target: bytes("x"))
        XCTAssertEqual(symlink.gid, 500)
    }
}
