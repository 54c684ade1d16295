import Foundation
import WeftTestSupport
import XCTest
import WeftHub
import WeftProto

/// A commit's claim of its objects (SPEC.md §5): a commit naming objects another commit under
/// way claimed waits for it, and gives up with ETIMEDOUT, claiming nothing.
final class PendingUploadsTests: XCTestCase {
    func testAClaimWaitsForTheCommitUnderWayAndGivesUpClaimingNothing() throws {
        let uploads = PendingUploads()
        for id: SliceID in [1, 2, 3] { uploads.add(id, session: 7) }
        XCTAssertEqual(try uploads.takeForCommit([1, 2], session: 7, waitSeconds: 0).sorted(), [1, 2])
        let started = Date()
        XCTAssertErrno(ETIMEDOUT, try uploads.takeForCommit([2, 3], session: 7, waitSeconds: 0.2))
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(started), 0.2, "it waited")
        XCTAssertEqual(uploads.take([3], session: 7), [3], "the timed-out claim took nothing")
        uploads.giveBack([3], session: 7)

        let done = DispatchSemaphore(value: 0)
        let claimed = LockedBox<[SliceID]?>(nil)
        Thread.detachNewThread {
            claimed.set(try? uploads.takeForCommit([2, 3], session: 7, waitSeconds: 10))
            done.signal()
        }
        XCTAssertEqual(done.wait(timeout: .now() + 0.3), .timedOut, "waits while 2 is claimed")
        uploads.endCommit([1, 2])
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success, "and goes on once that commit ends")
        XCTAssertEqual(claimed.get(), [3], "2 was the other commit's: not fresh to this one")
        XCTAssertEqual(try uploads.takeForCommit([9], session: 7, waitSeconds: 0), [], "unknown ids: nothing, no wait")
    }
}

private final class LockedBox<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: T
    init(_ value: T) { self.value = value }
    func set(_ newValue: T) { lock.withLock { value = newValue } }
    func get() -> T { lock.withLock { value } }
}
