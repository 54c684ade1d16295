#if canImport(Glibc)
import Glibc
#endif
import WeftTestSupport
import XCTest
import WeftProto
@testable import WeftMeta

/// lookup, create, mkdir, unlink, rmdir, symlink, readlink, link, access and statfs.
final class NamespaceTests: MetaStoreTestCase {
    func testFreshVolumeHasOnlyTheRoot() throws {
        let attributes = try store.getattr(root)
        XCTAssertEqual(attributes.ino, root)
        XCTAssertEqual(attributes.mode, FileType.directory | 0o755)
        XCTAssertEqual(attributes.nlink, 2)
        XCTAssertEqual(try names(in: root), [])
        XCTAssertEqual(store.currentCounters.inodes, 1)
        XCTAssertErrno(ENOENT, try store.getattr(999))
        try assertConsistent()
    }

    func testFormatRefusesAnExistingVolume() throws {
        let volume = store.volume
        try store.close()
        store = nil
        XCTAssertErrno(EEXIST, try MetaStore.format(path: path, volume: volume))
        let elsewhere = directory + "/missing"
        XCTAssertThrowsError(try MetaStore(path: elsewhere, durability: .strict, logger: testLogger("t")))
    }

    // MARK: lookup

    func testLookupFindsEntriesAndDots() throws {
        let directory = try makeDirectory("d")
        let file = try makeFile("f", in: directory.ino)
        XCTAssertEqual(try lookup("d").ino, directory.ino)
        XCTAssertEqual(try lookup("d"), try store.getattr(directory.ino))
        XCTAssertEqual(try lookup("f", in: directory.ino), file)
        XCTAssertEqual(try lookup(".", in: directory.ino).ino, directory.ino)
        XCTAssertEqual(try lookup("..", in: directory.ino).ino, root)
        XCTAssertEqual(try lookup("..").ino, root, "the root is its own parent")
    }

    func testLookupErrors() throws {
        let file = try makeFile("f")
        XCTAssertErrno(ENOENT, try lookup("missing"))
        XCTAssertErrno(ENOTDIR, try lookup("x", in: file.ino))
        XCTAssertErrno(ENOENT, try lookup("x", in: 4242), "a parent that does not exist")
        XCTAssertErrno(ENAMETOOLONG, try lookup(String(repeating: "n", count: 256)))
        XCTAssertErrno(ENOENT, try lookup(String(repeating: "n", count: 255)))
    }

    func testLookupNeedsSearchPermission() throws {
        let directory = try makeDirectory("private", mode: 0o700)
        try chown(directory.ino, to: Callers.alice)
        try makeFile("inside", in: directory.ino)
        // Without x on the directory even an existing name is EACCES, for owner and others alike.
        try chmod(directory.ino, 0o600)
        XCTAssertErrno(EACCES, try store.lookup(Callers.alice, parent: directory.ino, name: bytes("inside")))
        XCTAssertErrno(EACCES, try store.lookup(Callers.bob, parent: directory.ino, name: bytes("inside")))
        XCTAssertErrno(EACCES, try store.lookup(Callers.alice, parent: directory.ino, name: bytes("missing")))
        XCTAssertNoThrow(try store.lookup(Callers.root, parent: directory.ino, name: bytes("inside")))
        // With x for the owner only.
        try chmod(directory.ino, 0o100)
        XCTAssertNoThrow(try store.lookup(Callers.alice, parent: directory.ino, name: bytes("inside")))
        XCTAssertErrno(EACCES, try store.lookup(Callers.bob, parent: directory.ino, name: bytes("inside")))
    }

    // MARK: create

    func testCreateSetsAttributesAndTouchesTheParent() throws {
        try chmod(root, 0o777)
        let before = try store.getattr(root)
        let attributes = try store.create(Callers.alice, parent: root, name: bytes("file"), mode: FileType.regular | 0o666,
                                          rdev: 0, umask: 0o022, exclusive: true)
        XCTAssertEqual(attributes.mode, FileType.regular | 0o644, "umask applies")
        XCTAssertEqual(attributes.nlink, 1)
        XCTAssertEqual(attributes.uid, Callers.alice.uid)
        XCTAssertEqual(attributes.gid, Callers.alice.gid)
        XCTAssertEqual(attributes.size, 0)
        XCTAssertGreaterThan(attributes.ino, root)
        XCTAssertEqual(try store.getattr(attributes.ino), attributes)
        XCTAssertEqual(try lookup("file"), attributes)
        let after = try store.getattr(root)
        XCTAssertEqual(after.nlink, before.nlink, "a file is no subdirectory")
        XCTAssertGreaterThanOrEqual(after.mtimeNs, before.mtimeNs)
        XCTAssertGreaterThanOrEqual(after.mtimeNs, attributes.mtimeNs)
        XCTAssertEqual(store.currentCounters.inodes, 2)
    }

    func testCreateWithoutTypeMakesARegularFile() throws {
        let attributes = try store.create(Callers.root, parent: root, name: bytes("plain"), mode: 0o600, rdev: 0,
                                          umask: 0, exclusive: true)
        XCTAssertEqual(attributes.mode, FileType.regular | 0o600)
    }

    func testCreateSpecialFiles() throws {
        try chmod(root, 0o777)
        let fifo = try store.create(Callers.alice, parent: root, name: bytes("fifo"), mode: FileType.fifo | 0o600, rdev: 0,
                                    umask: 0, exclusive: true)
        XCTAssertEqual(fifo.fileType, FileType.fifo)
        let device = try store.create(Callers.root, parent: root, name: bytes("null"),
                                      mode: FileType.characterDevice | 0o666, rdev: 0x0103, umask: 0, exclusive: true)
        XCTAssertEqual(device.rdev, 0x0103)
        XCTAssertErrno(EPERM, try store.create(Callers.alice, parent: root, name: bytes("dev2"),
                                               mode: FileType.characterDevice | 0o666, rdev: 1, umask: 0, exclusive: true),
                       "only root makes device nodes")
        XCTAssertErrno(EINVAL, try store.create(Callers.root, parent: root, name: bytes("dir"),
                                                mode: FileType.directory | 0o755, rdev: 0, umask: 0, exclusive: true))
        XCTAssertErrno(EINVAL, try store.create(Callers.root, parent: root, name: bytes("link"),
                                                mode: FileType.symlink | 0o777, rdev: 0, umask: 0, exclusive: true))
    }

    func testCreateExistingName() throws {
        let first = try makeFile("f")
        XCTAssertErrno(EEXIST, try makeFile("f"))
        let again = try store.create(Callers.root, parent: root, name: bytes("f"), mode: FileType.regular | 0o600,
                                     rdev: 0, umask: 0, exclusive: false)
        XCTAssertEqual(again.ino, first.ino, "non-exclusive create returns the existing file")
        XCTAssertEqual(again.mode, first.mode, "and leaves its mode alone")
        try makeDirectory("d")
        XCTAssertErrno(EEXIST, try makeFile("d"))
        XCTAssertErrno(EISDIR, try store.create(Callers.root, parent: root, name: bytes("d"), mode: FileType.regular,
                                                rdev: 0, umask: 0, exclusive: false))
        XCTAssertErrno(EEXIST, try makeFile("."))
        XCTAssertErrno(EEXIST, try makeFile(".."))
        XCTAssertEqual(store.currentCounters.inodes, 3)
    }

    func testCreateNameRules() throws {
        XCTAssertNoThrow(try makeFile(String(repeating: "a", count: 255)))
        XCTAssertErrno(ENAMETOOLONG, try makeFile(String(repeating: "b", count: 256)))
        XCTAssertErrno(ENAMETOOLONG, try makeFile(String(repeating: "é", count: 128)), "the limit counts bytes")
        XCTAssertErrno(EINVAL, try makeFile("/"))
        XCTAssertErrno(EINVAL, try makeFile("a/b"))
        XCTAssertErrno(EINVAL, try store.create(Callers.root, parent: root, name: [0x61, 0], mode: FileType.regular,
                                                rdev: 0, umask: 0, exclusive: true))
        XCTAssertThrowsError(try makeFile(""))
        XCTAssertEqual(try names(in: root), [String(repeating: "a", count: 255)])
        // Any other byte is allowed, including invalid UTF-8.
        XCTAssertNoThrow(try store.create(Callers.root, parent: root, name: [0xFF, 0xFE, 0x01], mode: FileType.regular,
                                          rdev: 0, umask: 0, exclusive: true))
        XCTAssertEqual(try store.lookup(Callers.root, parent: root, name: [0xFF, 0xFE, 0x01]).nlink, 1)
    }

    func testCreateNeedsWriteAndSearchOnTheParent() throws {
        let directory = try makeDirectory("d", mode: 0o755)
        XCTAssertErrno(EACCES, try makeFile("f", in: directory.ino, as: Callers.alice))
        try chmod(directory.ino, 0o777)
        XCTAssertNoThrow(try makeFile("f", in: directory.ino, as: Callers.alice))
        try chmod(directory.ino, 0o666)
        XCTAssertErrno(EACCES, try makeFile("g", in: directory.ino, as: Callers.alice))
        let file = try lookup("f", in: directory.ino)
        XCTAssertErrno(ENOTDIR, try makeFile("x", in: file.ino))
        XCTAssertErrno(ENOENT, try makeFile("x", in: 31337))
    }

    // MARK: mkdir

    func testMkdir() throws {
        try chmod(root, 0o777)
        let directory = try store.mkdir(Callers.alice, parent: root, name: bytes("d"), mode: 0o777, umask: 0o027)
        XCTAssertEqual(directory.mode, FileType.directory | 0o750)
        XCTAssertEqual(directory.nlink, 2)
        XCTAssertEqual(directory.uid, Callers.alice.uid)
        XCTAssertEqual(try store.getattr(root).nlink, 3)
        let child = try makeDirectory("e", in: directory.ino)
        XCTAssertEqual(try store.getattr(directory.ino).nlink, 3)
        XCTAssertEqual(try lookup("..", in: child.ino).ino, directory.ino)
        XCTAssertErrno(EEXIST, try makeDirectory("d"))
        XCTAssertErrno(EEXIST, try makeDirectory(".", in: directory.ino))
        XCTAssertErrno(ENAMETOOLONG, try makeDirectory(String(repeating: "d", count: 256)))
        let file = try makeFile("f")
        XCTAssertErrno(ENOTDIR, try makeDirectory("x", in: file.ino))
        XCTAssertErrno(EACCES, try makeDirectory("y", in: directory.ino, as: Callers.bob), "no write permission")
        XCTAssertEqual(try store.getattr(root).nlink, 3)
        try assertConsistent()
    }

    // MARK: unlink, rmdir

    func testUnlink() throws {
        let file = try makeFile("f")
        try makeDirectory("d")
        XCTAssertErrno(EISDIR, try store.unlink(Callers.root, parent: root, name: bytes("d")))
        XCTAssertErrno(ENOENT, try store.unlink(Callers.root, parent: root, name: bytes("missing")))
        XCTAssertErrno(EISDIR, try store.unlink(Callers.root, parent: root, name: bytes(".")))
        XCTAssertErrno(ENOTDIR, try store.unlink(Callers.root, parent: file.ino, name: bytes("x")))
        XCTAssertErrno(EACCES, try store.unlink(Callers.alice, parent: root, name: bytes("f")))
        try store.unlink(Callers.root, parent: root, name: bytes("f"))
        XCTAssertErrno(ENOENT, try lookup("f"))
        XCTAssertErrno(ENOENT, try store.getattr(file.ino), "no link and not open: reclaimed")
        XCTAssertErrno(ENOENT, try store.unlink(Callers.root, parent: root, name: bytes("f")))
        XCTAssertEqual(store.currentCounters.inodes, 2)
        try assertConsistent()
    }

    func testRmdir() throws {
        let full = try makeDirectory("full")
        try makeFile("f", in: full.ino)
        let empty = try makeDirectory("empty")
        let file = try makeFile("file")
        XCTAssertEqual(try store.getattr(root).nlink, 4)
        XCTAssertErrno(ENOTEMPTY, try store.rmdir(Callers.root, parent: root, name: bytes("full")))
        XCTAssertErrno(ENOTDIR, try store.rmdir(Callers.root, parent: root, name: bytes("file")))
        XCTAssertErrno(ENOENT, try store.rmdir(Callers.root, parent: root, name: bytes("missing")))
        XCTAssertErrno(EINVAL, try store.rmdir(Callers.root, parent: empty.ino, name: bytes(".")))
        XCTAssertErrno(ENOTEMPTY, try store.rmdir(Callers.root, parent: empty.ino, name: bytes("..")))
        XCTAssertErrno(ENOTDIR, try store.rmdir(Callers.root, parent: file.ino, name: bytes("x")))
        XCTAssertErrno(EACCES, try store.rmdir(Callers.alice, parent: root, name: bytes("empty")))
        try store.rmdir(Callers.root, parent: root, name: bytes("empty"))
        XCTAssertErrno(ENOENT, try store.getattr(empty.ino))
        XCTAssertEqual(try store.getattr(root).nlink, 3)
        XCTAssertErrno(ENOENT, try makeFile("late", in: empty.ino), "a removed directory takes no new entries")
        try store.unlink(Callers.root, parent: full.ino, name: bytes("f"))
        try store.rmdir(Callers.root, parent: root, name: bytes("full"))
        XCTAssertEqual(try store.getattr(root).nlink, 2)
        XCTAssertEqual(store.currentCounters.inodes, 2)
        try assertConsistent()
    }

    // MARK: symlink, readlink

    func testSymlinkAndReadlink() throws {
        try chmod(root, 0o777)
        let target = bytes("../some/where/else")
        let link = try store.symlink(Callers.alice, parent: root, name: bytes("l"), target: target)
        XCTAssertEqual(link.mode, FileType.symlink | 0o777)
        XCTAssertEqual(link.size, UInt64(target.count))
        XCTAssertEqual(link.uid, Callers.alice.uid)
        XCTAssertEqual(try store.readlink(link.ino), target)
        XCTAssertEqual(try lookup("l").ino, link.ino)
        let file = try makeFile("f")
        XCTAssertErrno(EINVAL, try store.readlink(file.ino))
        XCTAssertErrno(EINVAL, try store.readlink(root))
        XCTAssertErrno(ENOENT, try store.readlink(9999))
        XCTAssertErrno(EEXIST, try store.symlink(Callers.root, parent: root, name: bytes("f"), target: target))
        XCTAssertErrno(ENOENT, try store.symlink(Callers.root, parent: root, name: bytes("empty"), target: []))
        let longest = [UInt8](repeating: 0x78, count: Limits.symlinkMaxBytes)
        XCTAssertEqual(try store.readlink(try store.symlink(Callers.root, parent: root, name: bytes("long"),
                                                             target: longest).ino), longest)
        XCTAssertErrno(ENAMETOOLONG, try store.symlink(Callers.root, parent: root, name: bytes("too-long"),
                                                       target: longest + [0x78]))
        try store.unlink(Callers.root, parent: root, name: bytes("l"))
        XCTAssertErrno(ENOENT, try store.readlink(link.ino))
        try assertConsistent()
    }

    // MARK: link

    func testHardLinks() throws {
        let directory = try makeDirectory("d")
        let file = try makeFile("f")
        let linked = try store.link(Callers.root, ino: file.ino, newParent: directory.ino, newName: bytes("g"))
        XCTAssertEqual(linked.nlink, 2)
        XCTAssertEqual(linked.ino, file.ino)
        XCTAssertEqual(try lookup("g", in: directory.ino).nlink, 2)
        XCTAssertEqual(try lookup("f").nlink, 2)
        XCTAssertErrno(EPERM, try store.link(Callers.root, ino: directory.ino, newParent: root, newName: bytes("d2")))
        XCTAssertErrno(EEXIST, try store.link(Callers.root, ino: file.ino, newParent: root, newName: bytes("d")))
        XCTAssertErrno(ENOENT, try store.link(Callers.root, ino: 777, newParent: root, newName: bytes("x")))
        XCTAssertErrno(ENOTDIR, try store.link(Callers.root, ino: file.ino, newParent: file.ino, newName: bytes("x")))
        XCTAssertErrno(EACCES, try store.link(Callers.alice, ino: file.ino, newParent: root, newName: bytes("x")))
        XCTAssertErrno(ENAMETOOLONG, try store.link(Callers.root, ino: file.ino, newParent: root,
                                                    newName: bytes(String(repeating: "l", count: 256))))
        try store.unlink(Callers.root, parent: root, name: bytes("f"))
        XCTAssertEqual(try store.getattr(file.ino).nlink, 1, "one name left")
        XCTAssertEqual(try lookup("g", in: directory.ino).ino, file.ino)
        try store.unlink(Callers.root, parent: directory.ino, name: bytes("g"))
        XCTAssertErrno(ENOENT, try store.getattr(file.ino))
        XCTAssertErrno(ENOENT, try store.link(Callers.root, ino: file.ino, newParent: root, newName: bytes("again")))
        XCTAssertEqual(store.currentCounters.inodes, 2)
        try assertConsistent()
    }

    func testSymlinkCanBeHardLinked() throws {
        let link = try store.symlink(Callers.root, parent: root, name: bytes("l"), target: bytes("t"))
        XCTAssertEqual(try store.link(Callers.root, ino: link.ino, newParent: root, newName: bytes("l2")).nlink, 2)
        try store.unlink(Callers.root, parent: root, name: bytes("l"))
        XCTAssertEqual(try store.readlink(link.ino), bytes("t"))
    }

    // MARK: access, statfs

    func testAccess() throws {
        let file = try makeFile("f", mode: 0o640)
        try chown(file.ino, to: Callers.alice)
        XCTAssertNoThrow(try store.access(Callers.alice, ino: file.ino, mask: 6))
        XCTAssertErrno(EACCES, try store.access(Callers.alice, ino: file.ino, mask: 1))
        XCTAssertErrno(EACCES, try store.access(Callers.bob, ino: file.ino, mask: 4))
        XCTAssertNoThrow(try store.access(Credentials(uid: 5, gid: 9, groups: [Callers.alice.gid]), ino: file.ino, mask: 4))
        XCTAssertErrno(EACCES, try store.access(Credentials(uid: 5, gid: Callers.alice.gid), ino: file.ino, mask: 2))
        XCTAssertNoThrow(try store.access(Callers.bob, ino: file.ino, mask: 0), "mask 0 checks existence")
        XCTAssertNoThrow(try store.access(Callers.root, ino: file.ino, mask: 6))
        XCTAssertErrno(EACCES, try store.access(Callers.root, ino: file.ino, mask: 1), "root needs some x bit")
        XCTAssertNoThrow(try store.access(Callers.root, ino: root, mask: 7))
        XCTAssertErrno(ENOENT, try store.access(Callers.root, ino: 4040, mask: 0))
    }

    func testStatfs() throws {
        try makeFile("a")
        let stats = try store.statfs(totalBytes: 1 << 30, freeBytes: 1 << 29)
        XCTAssertEqual(stats.nameMaxBytes, 255)
        XCTAssertEqual(UInt64(stats.blockSizeBytes) * stats.totalBlocks, 1 << 30)
        XCTAssertEqual(UInt64(stats.blockSizeBytes) * stats.freeBlocks, 1 << 29)
        XCTAssertEqual(stats.totalInodes - stats.freeInodes, 2)
    }

    /// A change given what its names must hold applies only if they still hold it, and changes
    /// nothing otherwise (SPEC.md §12.6, "A racing rename").
    func testChangesOfNamesApplyOnlyWhileTheNamesHoldWhatTheyExpect() throws {
        let file = try makeFile("f")
        let other = try makeFile("g")
        let directory = try makeDirectory("d")
        func changed(_ body: () throws -> Void) -> Bool {
            do { try body() } catch is EntryChanged { return true } catch { XCTFail("\(error)") }
            return false
        }
        XCTAssertTrue(changed { try store.unlink(Callers.root, parent: root, name: bytes("f"), expecting: .inode(other.ino)) })
        XCTAssertTrue(changed { try store.unlink(Callers.root, parent: root, name: bytes("f"), expecting: .absent) })
        XCTAssertTrue(changed { try store.rmdir(Callers.root, parent: root, name: bytes("d"), expecting: .inode(file.ino)) })
        XCTAssertTrue(changed {
            try store.rename(Callers.root, parent: root, name: bytes("f"), newParent: root, newName: bytes("g"), flags: [],
                             expecting: (.inode(file.ino), .absent))
        })
        XCTAssertTrue(changed {
            try store.rename(Callers.root, parent: root, name: bytes("f"), newParent: root, newName: bytes("g"), flags: [],
                             expecting: (.inode(other.ino), .inode(other.ino)))
        })
        XCTAssertEqual(try names(in: root), ["d", "f", "g"], "nothing changed")
        XCTAssertEqual(try lookup("f").nlink, 1)
        // Holding what they expect, the changes apply; an absent name expected absent gives the
        // change's own error.
        try store.rename(Callers.root, parent: root, name: bytes("f"), newParent: root, newName: bytes("g"), flags: [],
                         expecting: (.inode(file.ino), .inode(other.ino)))
        XCTAssertErrno(ENOENT, try store.unlink(Callers.root, parent: root, name: bytes("f"), expecting: .absent))
        try store.unlink(Callers.root, parent: root, name: bytes("g"), expecting: .inode(file.ino))
        try store.rmdir(Callers.root, parent: root, name: bytes("d"), expecting: .inode(directory.ino))
        XCTAssertEqual(try names(in: root), [])
        try assertConsistent()
    }
}
