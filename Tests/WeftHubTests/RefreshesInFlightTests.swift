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
        let ticket = refreshes.begin(7)
        let answered = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            usleep(50_000)
            refreshes.end(7, ticket)
            answered.signal()
        }
        XCTAssertLessThan(elapsedMs { refreshes.waitForNone(8) }, 40, "another inode does not wait")
        let waited = elapsedMs { refreshes.waitForNone(7) }
        XCTAssertGreaterThanOrEqual(waited, 45, "waited for the answer")
        answered.wait()
        // Right after an answer, the asking thread still has to take the attributes in.
        refreshes.end(7, refreshes.begin(7))
        XCTAssertGreaterThanOrEqual(elapsedMs { refreshes.waitForNone(7) }, Double(RefreshesInFlight.graceNs) / 1e6 * 0.9)
    }

    /// Another process that keeps `stat`ing the file must not hold every recall for the whole
    /// bound: only the refreshes under way when the invalidation asks are waited for.
    func testRefreshesThatBeginAfterTheInvalidationAskedDoNotHoldItUp() {
        let refreshes = RefreshesInFlight()
        let first = refreshes.begin(5)
        let stop = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            // A stream of overlapping refreshes of the same inode, each 5 ms, for 1.5 s.
            var current = first
            for _ in 0..<300 {
                let next = refreshes.begin(5)
                usleep(5_000)
                refreshes.end(5, current)
                current = next
            }
            refreshes.end(5, current)
            stop.signal()
        }
        let waited = elapsedMs { refreshes.waitForNone(5) }
        XCTAssertGreaterThanOrEqual(waited, 4, "waited for the refresh under way")
        XCTAssertLessThan(waited, 100, "not for the ones that began later")
        stop.wait()
    }

    func testAnInvalidationWaitsAtMostTheBound() {
        let refreshes = RefreshesInFlight()
        _ = refreshes.begin(9)   // never answered
        let waited = elapsedMs { refreshes.waitForNone(9) }
        XCTAssertGreaterThanOrEqual(waited, Double(RefreshesInFlight.waitMaxNs) / 1e6 * 0.9)
        XCTAssertLessThan(waited, 5_000)
    }
}
