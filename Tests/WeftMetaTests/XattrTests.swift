#if canImport(Glibc)
import Glibc
#endif
import WeftTestSupport
import XCTest
import WeftProto
@testable import WeftMeta

/// Extended attributes: flags, namespaces and their permission rules, limits.
final class XattrTests: MetaStoreTestCase {
    func testSetGetListRemove() throws {
        let file = try makeFile("f")
        try store.setxattr(Callers.root, ino: file.ino, name: bytes("user.b"), value: [1, 2, 3], flags: [])
        try store.setxattr(Callers.root, ino: file.ino, name: bytes("user.a"), value: [], flags: [])
        XCTAssertEqual(try store.getxattr(Callers.root, ino: file.ino, name: bytes("user.b")), [1, 2, 3])
        XCTAssertEqual(try store.getxattr(Callers.root, ino: file.ino, name: bytes("user.a")), [], "empty values exist")
        XCTAssertEqual(Set(try store.listxattr(Callers.root, ino: file.ino)), [bytes("user.a"), bytes("user.b")])
        try store.setxattr(Callers.root, ino: file.ino, name: bytes("user.b"), value: [9], flags: [])
        XCTAssertEqual(try store.getxattr(Callers.root, ino: file.ino, name: bytes("user.b")), [9], "overwritten")
        try store.removexattr(Callers.root, ino: file.ino, name: bytes("user.b"))
        XCTAssertErrno(ENODATA, try store.getxattr(Callers.root, ino: file.ino, name: bytes("user.b")))
        XCTAssertEqual(try store.listxattr(Callers.root, ino: file.ino), [bytes("user.a")])
        XCTAssertGreaterThanOrEqual(try store.getattr(file.ino).ctimeNs, file.ctimeNs)
    }

    func testCreateAndReplaceFlags() throws {
        let file = try makeFile("f")
        XCTAssertErrno(ENODATA, try store.setxattr(Callers.root, ino: file.ino, name: bytes("user.x"), value: [1],
                                                   flags: .replace))
        try store.setxattr(Callers.root, ino: file.ino, name: bytes("user.x"), value: [1], flags: .create)
        XCTAssertErrno(EEXIST, try store.setxattr(Callers.root, ino: file.ino, name: bytes("user.x"), value: [2],
                                                  flags: .create))
        try store.setxattr(Callers.root, ino: file.ino, name: bytes("user.x"), value: [3], flags: .replace)
        XCTAssertEqual(try store.getxattr(Callers.root, ino: file.ino, name: bytes("user.x")), [3])
    }

    func testMissingAttributes() throws {
        let file = try makeFile("f")
        XCTAssertErrno(ENODATA, try store.getxattr(Callers.root, ino: file.ino, name: bytes("user.none")))
        XCTAssertErrno(ENODATA, try store.removexattr(Callers.root, ino: file.ino, name: bytes("user.none")))
        XCTAssertEqual(try store.listxattr(Callers.root, ino: file.ino), [])
        XCTAssertErrno(ENOENT, try store.getxattr(Callers.root, ino: 8080, name: bytes("user.none")))
        XCTAssertErrno(ENOENT, try store.listxattr(Callers.root, ino: 8080))
        XCTAssertErrno(ENOENT, try store.setxattr(Callers.root, ino: 8080, name: bytes("user.a"), value: [], flags: []))
    }

    func testTrustedNamespaceIsRootsAndHidden() throws {
        let file = try makeFile("f", mode: 0o666)
        try chown(file.ino, to: Callers.alice)
        try store.setxattr(Callers.root, ino: file.ino, name: bytes("trusted.secret"), value: [7], flags: [])
        try store.setxattr(Callers.alice, ino: file.ino, name: bytes("user.open"), value: [8], flags: [])
        XCTAssertEqual(Set(try store.listxattr(Callers.root, ino: file.ino)), [bytes("trusted.secret"), bytes("user.open")])
        XCTAssertEqual(try store.listxattr(Callers.alice, ino: file.ino), [bytes("user.open")], "hidden from non-root")
        XCTAssertErrno(ENODATA, try store.getxattr(Callers.alice, ino: file.ino, name: bytes("trusted.secret")))
        XCTAssertErrno(EPERM, try store.setxattr(Callers.alice, ino: file.ino, name: bytes("trusted.mine"), value: [],
                                                 flags: []))
        XCTAssertErrno(EPERM, try store.removexattr(Callers.alice, ino: file.ino, name: bytes("trusted.secret")))
        XCTAssertEqual(try store.getxattr(Callers.root, ino: file.ino, name: bytes("trusted.secret")), [7])
    }

    func testSecurityNamespace() throws {
        let file = try makeFile("f", mode: 0o600)
        try chown(file.ino, to: Callers.alice)
        try store.setxattr(Callers.alice, ino: file.ino, name: bytes("security.label"), value: [1], flags: [])
        XCTAssertEqual(try store.getxattr(Callers.bob, ino: file.ino, name: bytes("security.label")), [1],
                       "readable by all")
        XCTAssertErrno(EPERM, try store.setxattr(Callers.bob, ino: file.ino, name: bytes("security.label"), value: [2],
                                                 flags: []))
    }

    func testUnknownNamespaceAndLimits() throws {
        let file = try makeFile("f")
        for name in ["system.posix_acl_access", "other.thing", "user", "nonamespace"] {
            XCTAssertErrno(EOPNOTSUPP, try store.setxattr(Callers.root, ino: file.ino, name: bytes(name), value: [],
                                                          flags: []), name)
            XCTAssertErrno(EOPNOTSUPP, try store.getxattr(Callers.root, ino: file.ino, name: bytes(name)), name)
        }
        XCTAssertErrno(ERANGE, try store.getxattr(Callers.root, ino: file.ino, name: []))
        let longName = bytes("user." + String(repeating: "n", count: Limits.xattrNameMaxBytes - 5))
        XCTAssertNoThrow(try store.setxattr(Callers.root, ino: file.ino, name: longName, value: [], flags: []))
        XCTAssertErrno(ERANGE, try store.setxattr(Callers.root, ino: file.ino, name: longName + [0x6E], value: [],
                                                  flags: []))
        let largest = [UInt8](repeating: 0xAB, count: Limits.xattrValueMaxBytes)
        try store.setxattr(Callers.root, ino: file.ino, name: bytes("user.big"), value: largest, flags: [])
        XCTAssertEqual(try store.getxattr(Callers.root, ino: file.ino, name: bytes("user.big")), largest)
        XCTAssertErrno(E2BIG, try store.setxattr(Callers.root, ino: file.ino, name: bytes("user.bigger"),
                                                 value: largest + [0], flags: []))
    }

    func testUserNamespaceFollowsFilePermissions() throws {
        let file = try makeFile("f", mode: 0o640)
        try chown(file.ino, to: Callers.alice)
        try store.setxattr(Callers.alice, ino: file.ino, name: bytes("user.x"), value: [1], flags: [])
        XCTAssertErrno(EACCES, try store.getxattr(Callers.bob, ino: file.ino, name: bytes("user.x")))
        XCTAssertErrno(EACCES, try store.setxattr(Callers.bob, ino: file.ino, name: bytes("user.y"), value: [], flags: []))
        let groupMember = Credentials(uid: 77, gid: Callers.alice.gid)
        XCTAssertEqual(try store.getxattr(groupMember, ino: file.ino, name: bytes("user.x")), [1])
        XCTAssertErrno(EACCES, try store.removexattr(groupMember, ino: file.ino, name: bytes("user.x")))
        // user.* is only for regular files and directories.
        let link = try store.symlink(Callers.root, parent: root, name: bytes("l"), target: bytes("f"))
        XCTAssertErrno(EPERM, try store.setxattr(Callers.root, ino: link.ino, name: bytes("user.x"), value: [], flags: []))
        XCTAssertErrno(ENODATA, try store.getxattr(Callers.root, ino: link.ino, name: bytes("user.x")))
        // On a sticky directory only its owner may set user.* attributes.
        let sticky = try makeDirectory("sticky", mode: 0o1777)
        XCTAssertErrno(EPERM, try store.setxattr(Callers.alice, ino: sticky.ino, name: bytes("user.x"), value: [],
                                                 flags: []))
        XCTAssertNoThrow(try store.setxattr(Callers.root, ino: sticky.ino, name: bytes("user.x"), value: [], flags: []))
    }

    func testAttributesGoWithTheInode() throws {
        let file = try makeFile("f")
        try store.setxattr(Callers.root, ino: file.ino, name: bytes("user.keep"), value: [5], flags: [])
        try store.setxattr(Callers.root, ino: root, name: bytes("user.root"), value: [6], flags: [])
        try reopen()
        XCTAssertEqual(try store.getxattr(Callers.root, ino: file.ino, name: bytes("user.keep")), [5])
        XCTAssertEqual(try store.getxattr(Callers.root, ino: root, name: bytes("user.root")), [6])
        try store.unlink(Callers.root, parent: root, name: bytes("f"))
        let next = try makeFile("g")
        XCTAssertNotEqual(next.ino, file.ino, "inode numbers are not reused")
        XCTAssertEqual(try store.listxattr(Callers.root, ino: next.ino), [])
        XCTAssertErrno(ENOENT, try store.getxattr(Callers.root, ino: file.ino, name: bytes("user.keep")))
        try assertConsistent()
    }
}
