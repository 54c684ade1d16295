import WeftHub
import WeftProto
import WeftTestSupport
import XCTest

/// Locks through the hub API (SPEC.md §12.6): the same assertions in-process and over TCP,
/// through the conformance fixture.
extension HubConformanceTests {
    private func posix(_ type: LockType, _ start: UInt64, _ end: UInt64, owner: UInt64, test: Bool = false) -> LockRequest {
        LockRequest(kind: .posix, type: type, start: start, end: end, owner: owner, pid: UInt32(owner), test: test)
    }

    func testPosixLocksConflictBetweenOwnersAndSessions() throws {
        let file = try makeFile("locked")
        let (other, _) = try api.openSession(agentName: "other-agent")
        let otherContext = RequestContext(session: other, credentials: rootCaller)

        XCTAssertEqual(try api.lock(context, ino: file.ino, posix(.write, 0, 99, owner: 1)), .none)
        // Another session: the write lock conflicts with a read lock on an overlapping range...
        XCTAssertErrno(EAGAIN, try api.lock(otherContext, ino: file.ino, posix(.read, 50, 60, owner: 1)))
        // ...and F_GETLK reports who holds it.
        XCTAssertEqual(try api.lock(otherContext, ino: file.ino, posix(.read, 50, 60, owner: 1, test: true)),
                       LockDescription(type: .write, start: 0, end: 99, pid: 1))
        // A disjoint range is free, and so is the same range for the same owner (replaced).
        XCTAssertEqual(try api.lock(otherContext, ino: file.ino, posix(.write, 100, 200, owner: 1)), .none)
        XCTAssertEqual(try api.lock(context, ino: file.ino, posix(.read, 0, 99, owner: 1)), .none)
        // Two read locks share; another owner of the same session conflicts with a write.
        XCTAssertEqual(try api.lock(otherContext, ino: file.ino, posix(.read, 10, 20, owner: 2)), .none)
        XCTAssertErrno(EAGAIN, try api.lock(context, ino: file.ino, posix(.write, 15, 15, owner: 2)))

        // Unlocking part of a range splits it.
        XCTAssertEqual(try api.lock(context, ino: file.ino, posix(.write, 300, 399, owner: 5)), .none)
        XCTAssertEqual(try api.lock(context, ino: file.ino, posix(.unlock, 320, 329, owner: 5)), .none)
        XCTAssertEqual(try api.lock(otherContext, ino: file.ino, posix(.write, 320, 329, owner: 9)), .none)
        XCTAssertErrno(EAGAIN, try api.lock(otherContext, ino: file.ino, posix(.write, 319, 319, owner: 9)))
        XCTAssertErrno(EAGAIN, try api.lock(otherContext, ino: file.ino, posix(.write, 330, 330, owner: 9)))

        // The session's locks go with it.
        try api.closeSession(other)
        XCTAssertEqual(try api.lock(context, ino: file.ino, posix(.write, 100, 200, owner: 7)), .none)
    }

    func testFlockIsWholeFileAndSeparateFromPosix() throws {
        let file = try makeFile("flocked")
        let (other, _) = try api.openSession(agentName: "other-agent")
        let otherContext = RequestContext(session: other, credentials: rootCaller)
        let exclusive = LockRequest(kind: .flock, type: .write, owner: 11, pid: 11)
        let shared = LockRequest(kind: .flock, type: .read, owner: 12, pid: 12)
        XCTAssertEqual(try api.lock(context, ino: file.ino, exclusive), .none)
        XCTAssertErrno(EAGAIN, try api.lock(otherContext, ino: file.ino, shared))
        // POSIX and flock locks do not see each other (Linux).
        XCTAssertEqual(try api.lock(otherContext, ino: file.ino, posix(.write, 0, .max, owner: 12)), .none)
        // The holder converts to shared; then shared locks coexist.
        XCTAssertEqual(try api.lock(context, ino: file.ino, LockRequest(kind: .flock, type: .read, owner: 11, pid: 11)), .none)
        XCTAssertEqual(try api.lock(otherContext, ino: file.ino, shared), .none)
        XCTAssertErrno(EAGAIN, try api.lock(otherContext, ino: file.ino, LockRequest(kind: .flock, type: .write, owner: 13, pid: 13)))
        XCTAssertEqual(try api.lock(context, ino: file.ino, LockRequest(kind: .flock, type: .unlock, owner: 11, pid: 11)), .none)
        XCTAssertEqual(try api.lock(otherContext, ino: file.ino, LockRequest(kind: .flock, type: .unlock, owner: 12, pid: 12)), .none)
        XCTAssertEqual(try api.lock(otherContext, ino: file.ino, LockRequest(kind: .flock, type: .write, owner: 13, pid: 13)), .none)
    }

    func testLockErrors() throws {
        let file = try makeFile("f")
        XCTAssertErrno(EINVAL, try api.lock(context, ino: file.ino, posix(.write, 10, 5, owner: 1)))
        XCTAssertErrno(ENOENT, try api.lock(context, ino: 987_654, posix(.write, 0, 5, owner: 1)))
    }
}
