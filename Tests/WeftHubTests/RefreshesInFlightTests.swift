import Foundation
import WeftProto
import WeftVFS
import XCTest

/// A recall's invalidation of an inode waits for the `GETATTR`s of that inode being answered
/// (SPEC.md §12.6, "A size refresh that a recall overtakes").
final class RefreshesInFlightTests: XCTestCase {
    private func elapsedMs(_ body: () -> Void) -> Double {
        let start = Leases.nowNs()
        body()
        return Double(Leases.nowNs() - start) / 1e6
    }

    func testAnInvalidationWaitsForTheAnswerOfItsInodesRefreshAndTheGraceAfter() {
        let refreshes = RefreshesInFlight()
        XCTAssertLessThan(elapsedMs { refreshes.waitForNone(7) }, 100, "nothing in flight: no wait")
        refreshes.begin(7)
        let answered = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            usleep(50_000)
            refreshes.end(7)
            answered.signal()
        }
        XCTAssertLessThan(elapsedMs { refreshes.waitForNone(8) }, 40, "another inode does not wait")
        let waited = elapsedMs { refreshes.waitForNone(7) }
        XCTAssertGreaterThanOrEqual(waited, 45, "waited for the answer")
        answered.wait()
        // Right after an answer, the asking thread still has to take the attributes in.
        refreshes.begin(7)
        refreshes.end(7)
        XCTAssertGreaterThanOrEqual(elapsedMs { refreshes.waitForNone(7) }, Double(RefreshesInFlight.graceNs) / 1e6 * 0.9)
    }

    func testAnInvalidationWaitsAtMostTheBound() {
        let refreshes = RefreshesInFlight()
        refreshes.begin(9)   // never answered
        let waited = elapsedMs { refreshes.waitForNone(9) }
        XCTAssertGreaterThanOrEqual(waited, Double(RefreshesInFlight.waitMaxNs) / 1e6 * 0.9)
        XCTAssertLessThan(waited, 5_000)
    }
}
