#if canImport(Glibc)
import Glibc
#endif
import WeftTestSupport
import XCTest
import WeftProto
@testable import WeftMeta

/// rename(2) and renameat2(2) semantics: replacement rules, RENAME_NOREPLACE, RENAME_EXCHANGE,
/// loops, hard links and link counts.
final class RenameTests: MetaStoreTestCase {
    private func rename(_ name: String, from parent: InodeID? = nil, to newName: String, into newParent: InodeID? = nil,
                        flags: RenameFlags = [], as credentials: Credentials = Callers.root) throws {
        try store.rename(credentials, parent: parent ?? root, name: bytes(name), newParent: newParent ?? root,
                         newName: bytes(newName), flags: flags)
    }

    func testRenameWithinADirectory() throws {
        let file = try makeFile("a")
        try rename("a", to: "b")
        XCTAssertErrno(ENOENT, try lookup("a"))
        XCTAssertEqual(try lookup("b").ino, file.ino)
        XCTAssertEqual(try store.getattr(file.ino).nlink, 1)
        XCTAssertErrno(ENOENT, try rename("a", to: "c"))
        try rename("b", to: "b")
        XCTAssertEqual(try lookup("b").ino, file.ino, "renaming onto itself changes nothing")
        try assertConsistent()
    }

    func testRenameDirectoryAcrossDirectoriesMovesLinkCounts() throws {
        let from = try makeDirectory("from")
        let to = try makeDirectory("to")
        let moving = try makeDirectory("moving", in: from.ino)
        XCTAssertEqual(try store.getattr(from.ino).nlink, 3)
        try rename("moving", from: from.ino, to: "moved", into: to.ino)
        XCTAssertEqual(try store.getattr(from.ino).nlink, 2)
        XCTAssertEqual(try store.getattr(to.ino).nlink, 3)
        XCTAssertEqual(try lookup("..", in: moving.ino).ino, to.ino, "'..' follows the move")
        XCTAssertEqual(try names(in: from.ino), [])
        XCTAssertEqual(try names(in: to.ino), ["moved"])
        try assertConsistent()
    }

    func testReplaceFile() throws {
        let source = try makeFile("source")
        let victim = try makeFile("victim")
        let directory = try makeDirectory("d")
        try rename("source", to: "victim", into: root)
        XCTAssertEqual(try lookup("victim").ino, source.ino)
        XCTAssertErrno(ENOENT, try store.getattr(victim.ino), "the replaced file is reclaimed")
        XCTAssertEqual(store.currentCounters.inodes, 3)
        // Replacing one of two links only drops a link.
        let other = try makeFile("other", in: directory.ino)
        _ = try store.link(Callers.root, ino: other.ino, newParent: root, newName: bytes("other-link"))
        try rename("victim", to: "other", into: directory.ino)
        XCTAssertEqual(try store.getattr(other.ino).nlink, 1)
        XCTAssertEqual(try lookup("other", in: directory.ino).ino, source.ino)
        XCTAssertEqual(try lookup("other-link").ino, other.ino)
        try assertConsistent()
    }

    func testReplaceEmptyDirectory() throws {
        let a = try makeDirectory("a")
        let b = try makeDirectory("b")
        let parent = try makeDirectory("p")
        let c = try makeDirectory("c", in: parent.ino)
        XCTAssertEqual(try store.getattr(root).nlink, 5)
        try rename("a", to: "b")
        XCTAssertEqual(try lookup("b").ino, a.ino)
        XCTAssertErrno(ENOENT, try store.getattr(b.ino))
        XCTAssertEqual(try store.getattr(root).nlink, 4, "one subdirectory fewer")
        // Across directories.
        try rename("b", to: "c", into: parent.ino)
        XCTAssertErrno(ENOENT, try store.getattr(c.ino))
        XCTAssertEqual(try store.getattr(root).nlink, 3)
        XCTAssertEqual(try store.getattr(parent.ino).nlink, 3)
        XCTAssertEqual(try lookup("..", in: a.ino).ino, parent.ino)
        XCTAssertEqual(store.currentCounters.inodes, 3)
        try assertConsistent()
    }

    func testReplaceErrors() throws {
        let full = try makeDirectory("full")
        try makeFile("inside", in: full.ino)
        try makeDirectory("empty")
        try makeDirectory("dir")
        try makeFile("file")
        XCTAssertErrno(ENOTEMPTY, try rename("dir", to: "full"))
        XCTAssertErrno(EISDIR, try rename("file", to: "empty"))
        XCTAssertErrno(ENOTDIR, try rename("dir", to: "file"))
        XCTAssertErrno(ENOTDIR, try rename("x", from: try lookup("file").ino, to: "y"))
        XCTAssertErrno(EBUSY, try rename(".", to: "x"))
        XCTAssertErrno(EBUSY, try rename("file", to: ".."))
        XCTAssertErrno(ENAMETOOLONG, try rename("file", to: String(repeating: "r", count: 256)))
        XCTAssertErrno(EINVAL, try rename("file", to: "a/b"))
        XCTAssertErrno(EINVAL, try rename("file", to: "x", flags: [.noReplace, .exchange]))
        XCTAssertErrno(EINVAL, try rename("file", to: "x", flags: RenameFlags(rawValue: 4)))
        XCTAssertEqual(try names(in: root).sorted(), ["dir", "empty", "file", "full"], "nothing moved")
        try assertConsistent()
    }

    func testRenameNeedsWriteOnBothDirectories() throws {
        try chmod(root, 0o777)
        let source = try makeDirectory("src", as: Callers.alice)
        let target = try makeDirectory("dst", mode: 0o755)
        try makeFile("f", in: source.ino, as: Callers.alice)
        XCTAssertErrno(EACCES, try rename("f", from: source.ino, to: "f", into: target.ino, as: Callers.alice))
        XCTAssertErrno(EACCES, try rename("f", from: source.ino, to: "g", into: source.ino, as: Callers.bob))
        // Moving a directory to another parent needs write permission on it (its '..' changes).
        let sub = try makeDirectory("sub", in: source.ino, mode: 0o555, as: Callers.alice)
        try chmod(target.ino, 0o777)
        XCTAssertErrno(EACCES, try rename("sub", from: source.ino, to: "sub", into: target.ino, as: Callers.alice))
        try rename("sub", from: source.ino, to: "renamed", into: source.ino, as: Callers.alice)
        XCTAssertEqual(try lookup("renamed", in: source.ino).ino, sub.ino, "within one parent it does not")
    }

    func testNoReplace() throws {
        let a = try makeFile("a")
        let b = try makeFile("b")
        XCTAssertErrno(EEXIST, try rename("a", to: "b", flags: .noReplace))
        XCTAssertEqual(try lookup("b").ino, b.ino)
        try rename("a", to: "c", flags: .noReplace)
        XCTAssertEqual(try lookup("c").ino, a.ino)
        try assertConsistent()
    }

    func testExchangeFileAndDirectoryAcrossDirectories() throws {
        let left = try makeDirectory("left")
        let right = try makeDirectory("right")
        let file = try makeFile("file", in: left.ino)
        let directory = try makeDirectory("dir", in: right.ino)
        try makeFile("inner", in: directory.ino)
        XCTAssertEqual(try store.getattr(left.ino).nlink, 2)
        XCTAssertEqual(try store.getattr(right.ino).nlink, 3)
        try rename("file", from: left.ino, to: "dir", into: right.ino, flags: .exchange)
        XCTAssertEqual(try lookup("file", in: left.ino).ino, directory.ino)
        XCTAssertEqual(try lookup("dir", in: right.ino).ino, file.ino)
        XCTAssertEqual(try store.getattr(left.ino).nlink, 3, "left gained a subdirectory")
        XCTAssertEqual(try store.getattr(right.ino).nlink, 2, "right lost one")
        XCTAssertEqual(try lookup("..", in: directory.ino).ino, left.ino)
        XCTAssertEqual(try names(in: directory.ino), ["inner"], "a non-empty directory can be exchanged")
        XCTAssertEqual(store.currentCounters.inodes, 6)
        try assertConsistent()
    }

    func testExchangeWithinADirectoryAndErrors() throws {
        let a = try makeFile("a")
        let d = try makeDirectory("d")
        try rename("a", to: "d", flags: .exchange)
        XCTAssertEqual(try lookup("a").ino, d.ino)
        XCTAssertEqual(try lookup("d").ino, a.ino)
        XCTAssertEqual(try store.getattr(root).nlink, 3)
        XCTAssertErrno(ENOENT, try rename("a", to: "missing", flags: .exchange))
        XCTAssertErrno(ENOENT, try rename("missing", to: "a", flags: .exchange))
        try assertConsistent()
    }

    func testExchangeTwoDirectoriesAcrossParents() throws {
        let left = try makeDirectory("left")
        let right = try makeDirectory("right")
        let a = try makeDirectory("a", in: left.ino)
        let b = try makeDirectory("b", in: right.ino)
        try rename("a", from: left.ino, to: "b", into: right.ino, flags: .exchange)
        XCTAssertEqual(try lookup("a", in: left.ino).ino, b.ino)
        XCTAssertEqual(try lookup("b", in: right.ino).ino, a.ino)
        XCTAssertEqual(try lookup("..", in: a.ino).ino, right.ino)
        XCTAssertEqual(try lookup("..", in: b.ino).ino, left.ino)
        XCTAssertEqual(try store.getattr(left.ino).nlink, 3)
        XCTAssertEqual(try store.getattr(right.ino).nlink, 3)
        XCTAssertErrno(ENOENT, try rename("a", from: left.ino, to: "x", into: 9999))
        XCTAssertErrno(ENOTDIR, try rename("a", from: left.ino, to: "x", into: try makeFile("file").ino))
        try assertConsistent()
    }

    func testDirectoryCannotMoveIntoItself() throws {
        let a = try makeDirectory("a")
        let b = try makeDirectory("b", in: a.ino)
        let c = try makeDirectory("c", in: b.ino)
        XCTAssertErrno(EINVAL, try rename("a", to: "x", into: c.ino))
        XCTAssertErrno(EINVAL, try rename("a", to: "x", into: a.ino))
        XCTAssertErrno(EINVAL, try rename("b", from: a.ino, to: "y", into: b.ino))
        // Exchanging a directory with one of its ancestors would make a loop too.
        XCTAssertErrno(EINVAL, try rename("c", from: b.ino, to: "a", flags: .exchange))
        // Replacing an ancestor: it is not empty.
        XCTAssertErrno(ENOTEMPTY, try rename("c", from: b.ino, to: "a"))
        try rename("c", from: b.ino, to: "c", into: root)
        XCTAssertEqual(try lookup("..", in: c.ino).ino, root)
        try assertConsistent()
    }

    func testHardLinksToOneInodeAreLeftAlone() throws {
        let file = try makeFile("a")
        _ = try store.link(Callers.root, ino: file.ino, newParent: root, newName: bytes("b"))
        try rename("a", to: "b")
        XCTAssertEqual(try lookup("a").ino, file.ino, "rename(2) between links of one inode does nothing")
        XCTAssertEqual(try lookup("b").ino, file.ino)
        XCTAssertEqual(try store.getattr(file.ino).nlink, 2)
        XCTAssertErrno(EEXIST, try rename("a", to: "b", flags: .noReplace))
        try rename("a", to: "b", flags: .exchange)
        XCTAssertEqual(try store.getattr(file.ino).nlink, 2)
        try assertConsistent()
    }

    func testRenameUpdatesTimes() throws {
        let file = try makeFile("a")
        let directory = try makeDirectory("d")
        let before = try store.getattr(directory.ino)
        usleep(2000)
        try rename("a", to: "a", into: directory.ino)
        XCTAssertGreaterThan(try store.getattr(file.ino).ctimeNs, file.ctimeNs)
        XCTAssertGreaterThan(try store.getattr(directory.ino).mtimeNs, before.mtimeNs)
    }

    func testRenameKeepsXattrsAndLayout() throws {
        let file = try makeFile("a")
        try store.setxattr(Callers.root, ino: file.ino, name: bytes("user.tag"), value: [1, 2], flags: [])
        let commit = try slice(0, offset: 0, length: 10)
        _ = try store.commitSlices(ino: file.ino, slices: [commit], minimumSize: 10, durable: true)
        let directory = try makeDirectory("d")
        try rename("a", to: "b", into: directory.ino)
        XCTAssertEqual(try store.getxattr(Callers.root, ino: file.ino, name: bytes("user.tag")), [1, 2])
        XCTAssertEqual(try store.layout(ino: file.ino, firstChunk: 0, count: 1).1, [[commit.slice]])
        XCTAssertEqual(try store.takeGarbage(limit: 10), [], "a rename discards no data")
    }
}
